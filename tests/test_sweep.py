"""The density sweep: one exact-density run per (method, density), curves ordered by density, a real PNG."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from ballot.errors import ConfigError, UnknownMethodError
from ballot.experiment import check_experiment
from ballot.sweep import curves, plot_curves, plot_rows, run_sweep
from tests.conftest import tiny_config


def test_every_method_runs_at_every_density_and_the_hook_configures_each_run(tiny_data, tiny_dense):
    cfg = tiny_config("sweep.densities=[0.3, 0.1]", "sweep.methods=[magnitude, random]")
    seen = []

    def configure(run_cfg):
        seen.append((run_cfg.prune.method, run_cfg.base.density))
        return run_cfg

    points = run_sweep(cfg, tiny_data, tiny_dense, configure, progress=False)
    assert seen == [("magnitude", 0.3), ("magnitude", 0.1), ("random", 0.3), ("random", 0.1)]
    assert [(p["method"], p["target_density"]) for p in points] == seen
    for point in points:
        assert point["density"] == pytest.approx(point["target_density"], abs=2e-3)
        assert 0 <= point["worst_class"] <= point["acc"] <= 1 and point["cwv"] >= 0 and point["seconds"] > 0


def test_curves_group_by_method_in_density_order():
    points = [{"method": "a", "density": 0.1}, {"method": "b", "density": 0.5}, {"method": "a", "density": 0.02}]
    assert curves(points) == {"a": [points[2], points[0]], "b": [points[1]]}


def test_plot_rows_hold_one_file_per_folder_and_method_with_its_columns():
    points = [{"method": "lth", "density": d, "acc": 0.9, "worst_class": 0.5, "cwv": 0.01, "mcd": 0.4}
              for d in (0.2, 0.05)]
    rows = plot_rows(points)
    assert rows == {"accuracy/lth.json": [{"density": 0.05, "acc": 0.9, "worst_class": 0.5},
                                          {"density": 0.2, "acc": 0.9, "worst_class": 0.5}],
                    "cwv/lth.json": [{"density": 0.05, "cwv": 0.01}, {"density": 0.2, "cwv": 0.01}]}


def test_with_the_sweep_off_every_configured_method_gets_empty_plot_files_and_the_figure_says_so(tmp_path,
                                                                                                    monkeypatch):
    from matplotlib.figure import Figure

    assert plot_rows([], ["lth", "ballot"]) == {"accuracy/lth.json": [], "accuracy/ballot.json": [],
                                                "cwv/lth.json": [], "cwv/ballot.json": []}
    written = []
    text = Figure.text
    monkeypatch.setattr(Figure, "text", lambda self, x, y, s, *args, **kwargs: written.append(s) or
                        text(self, x, y, s, *args, **kwargs))
    with Image.open(plot_curves([], {"acc": 0.95, "cwv": 0.005}, tmp_path / "curve.png")) as image:
        assert image.format == "PNG"
    assert any("sweep is off" in line for line in written), written


def test_the_figure_is_a_png(tmp_path):
    points = [{"method": m, "density": d, "acc": 0.9 - d, "cwv": 0.01 + d} for m in ("lth", "ballot")
              for d in (0.2, 0.05)]
    path = plot_curves(points, {"acc": 0.95, "cwv": 0.005}, tmp_path / "curve.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"], "no temp file is left behind"


@pytest.mark.parametrize("override, message", [
    ("sweep.densities=[0.5, 1.5]", "sweep.densities[1]: must be in (0, 1], got 1.5"),
    ("sweep.densities=[0.5, 0.5]", "sweep.densities: duplicate values"),
    ("sweep.methods=[]", "sweep.methods: must name at least one method"),
])
def test_bad_sweep_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(override)


def test_an_unknown_sweep_method_fails_before_any_work():
    with pytest.raises(UnknownMethodError, match="prayer"):
        check_experiment(tiny_config("sweep.methods=[lth, prayer]"))
