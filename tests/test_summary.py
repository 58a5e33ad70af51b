"""ballot.summary (the block a run ends with) and the pipeline's summary script."""

from __future__ import annotations

import hashlib
import json

import pytest

from ballot.summary import file_size, summary

METRICS = {"method": "ballot", "density": 0.05, "acc": 0.8123, "cwv": 0.01116, "mcd": 0.3787, "worst_class": 0.595,
           "worst_class_name": "Shirt", "dense": {"acc": 0.845, "cwv": 0.01736, "mcd": 0.4743, "worst_class": 0.5}}


def test_summary_of_a_hand_made_mapping():
    shipped = {**METRICS, "onnx_bytes": 1_110_000,
               "registration": {"name": "ballot-fashion-mnist", "version": "3", "alias": "challenger"}}
    assert summary(shipped).splitlines() == [
        "method       ballot",
        "density      0.0500 kept (95.0% pruned)",
        "accuracy     0.8123 (dense 0.8450, -3.3 pts)",
        "CWV          0.01116 (dense 0.01736)",
        "MCD          0.3787 (dense 0.4743)",
        "worst class  Shirt 0.5950",
        "ONNX         1.06 MiB",
        "registered   ballot-fashion-mnist version 3 @challenger",
    ]


@pytest.mark.parametrize("looked_up, line", [
    ({"alias_now": "3"}, "registered   m version 3 @challenger"),
    ({}, "registered   m version 3 @challenger"),
    ({"alias_now": "5"}, "registered   m version 3 @challenger (@challenger now points to version 5)"),
    ({"alias_now": None}, "registered   m version 3 @challenger (the registry has no @challenger now)"),
    ({"alias_unchecked": "cannot reach the tracking server"},
     "registered   m version 3 @challenger (@challenger not checked: cannot reach the tracking server)"),
])
def test_summary_says_where_the_alias_points_now(looked_up, line):
    registration = {"name": "m", "version": "3", "alias": "challenger", **looked_up}
    assert summary({**METRICS, "registration": registration}).splitlines()[-1] == line


def test_summary_without_dense_export_or_registry_and_with_unknown_values():
    lines = summary({**METRICS, "dense": None, "cwv": None, "mcd": float("nan")}).splitlines()
    assert lines[2:] == ["accuracy     0.8123", "CWV          n/a", "MCD          n/a", "worst class  Shirt 0.5950"]


def test_summary_names_the_final_training_that_was_kept():
    choice = {"kept": "plain",
              "objectives": {"refined from theta_k": 0.61234, "refined from theta_T": 0.65, "plain": 0.70001}}
    assert summary({**METRICS, "final_choice": choice}).splitlines()[-1] == \
        "final training  plain (val objective 0.7000; refined from theta_k 0.6123, refined from theta_T 0.6500)"
    assert "final training" not in summary({**METRICS, "final_choice": None})


def test_file_sizes():
    assert [file_size(n) for n in (812, 14_540, 3 * 1024 ** 2)] == ["812 B", "14.2 KiB", "3.00 MiB"]


def test_pipeline_summary_reads_the_stage_outputs(tmp_path, monkeypatch, capsys):
    from pipelines import summary as script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({k: v for k, v in METRICS.items() if k != "method"}))
    (tmp_path / "artifacts/prune").mkdir(parents=True)
    (tmp_path / "artifacts/prune/metrics.json").write_text(json.dumps({"method": "ballot"}))
    assert script.main() == 0  # no details.json: no final-training line
    out = capsys.readouterr().out
    assert "method       ballot" in out and "ONNX" not in out and "registered" not in out and "final" not in out
    choice = {"kept": "refined", "objectives": {"refined": 0.7, "plain": 0.6}}
    (tmp_path / "artifacts/prune/details.json").write_text(json.dumps({"rounds": [], "final_choice": choice}))
    assert script.main() == 0
    assert "final training  refined (val objective 0.7000; plain 0.6000)" in capsys.readouterr().out
    (tmp_path / "artifacts/export").mkdir()
    (tmp_path / "artifacts/export/export.json").write_text(json.dumps({"onnx_bytes": 900}))
    (tmp_path / "artifacts/export/model.onnx").write_bytes(b"onnx")
    (tmp_path / "artifacts/register.json").write_text(json.dumps({"name": "m", "version": "2", "alias": "challenger",
                                                                  "onnx_sha256": hashlib.sha256(b"onnx").hexdigest()}))
    assert script.main() == 0
    assert summary({**METRICS, "final_choice": choice, "onnx_bytes": 900,
                    "registration": {"name": "m", "version": "2", "alias": "challenger"}}) in capsys.readouterr().out


def test_pipeline_summary_without_metrics_exits_2(tmp_path, monkeypatch, capsys):
    from pipelines import summary as script

    monkeypatch.chdir(tmp_path)
    assert script.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("summary: error: 'metrics.json' not found") and err.count("\n") == 1


@pytest.mark.parametrize("metrics, prune, message", [
    ({}, {"method": "ballot"}, "'metrics.json' has no 'density'"),
    ([], {"method": "ballot"}, "'metrics.json' holds an array, not a JSON object"),
    ({k: v for k, v in METRICS.items() if k != "cwv"}, {"method": "ballot"}, "'metrics.json' has no 'cwv'"),
    (METRICS, {}, "'artifacts/prune/metrics.json' has no 'method'"),
    (METRICS, "ballot", "'artifacts/prune/metrics.json' holds a string, not a JSON object"),
])
def test_pipeline_summary_names_a_metrics_file_of_the_wrong_shape(tmp_path, monkeypatch, capsys, metrics, prune,
                                                                   message):
    from pipelines import summary as script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "artifacts/prune").mkdir(parents=True)
    (tmp_path / "artifacts/prune/metrics.json").write_text(json.dumps(prune))
    assert script.main() == 2
    assert capsys.readouterr().err == f"summary: error: {message}: run the stage that writes it (dvc repro)\n"


def test_summary_reads_an_unknown_density_or_size_as_not_available():
    lines = summary({**METRICS, "density": None, "onnx_bytes": "big"}).splitlines()
    assert lines[1] == "density      n/a" and lines[-1] == "ONNX         n/a"
