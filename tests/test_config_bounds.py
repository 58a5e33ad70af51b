"""Edge values found by fuzzing the configuration: each gets a one-line ConfigError naming the key or file."""

import pytest

from ballot.config import apply_overrides, experiment_from_params, load_yaml
from ballot.errors import ConfigError

HUGE = "1" + "0" * 400  # an integer beyond the float range
LONG = "1" * 5000  # beyond Python's 4300-digit limit on reading an integer


def build(*overrides: str):
    return experiment_from_params(apply_overrides({}, list(overrides)))


@pytest.mark.parametrize("override, key", [
    (f"train_dense.lr={HUGE}", "train_dense.lr"),
    (f"base.density={HUGE}", "base.density"),
    (f"sweep.densities=[0.5, {HUGE}]", r"sweep.densities\[1\]"),
    (f"tune.timeout_s={HUGE}", "tune.timeout_s"),
    (f"tune.space={{prune.ballot.layer_floor: {{type: float, low: 0, high: {HUGE}}}}}",
     "tune.space.prune.ballot.layer_floor.high"),
    (f"tune.space={{prune.ballot.rounds: {{type: int, low: 1, high: {HUGE}}}}}", "tune.space.prune.ballot.rounds.high"),
])
def test_an_integer_beyond_the_float_range_is_named(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: an integer of about 401 digits is too large for a number$"):
        build(override)


def test_an_integer_too_long_to_read_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'base.seed=1{5000}': the value is not valid YAML \(Exceeds"):
        build(f"base.seed={LONG}")
    path = tmp_path / "params.yaml"
    path.write_text(f"base:\n  seed: {LONG}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML \(Exceeds the limit"):
        load_yaml(path)


@pytest.mark.parametrize("override, message", [
    (f"base.seed={2**64}", r"^base.seed: must be in \[-2\*\*63, 2\*\*64\) \(torch's range\), got 18446744073709551616$"),
    (f"base.seed={-2**63 - 1}", r"^base.seed: must be in \[-2\*\*63, 2\*\*64\)"),
    (f"base.seed={HUGE}", "^base.seed: .*, got an integer of about 401 digits$"),
    ("tune.seed=-1", r"^tune.seed: must be in \[0, 2\*\*32\) \(Optuna's seeds\), got -1$"),
    (f"tune.seed={2**32}", r"^tune.seed: must be in \[0, 2\*\*32\)"),
])
def test_seeds_outside_what_torch_and_optuna_take_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        build(override)


def test_the_last_seed_serves_every_worker():
    """Worker i seeds its sampler with (seed + i) mod 2**32 (ballot.tuning.study.make_sampler)."""
    from ballot.tuning.study import make_sampler

    tune = build(f"tune.seed={2**32 - 1}", "tune.workers=4").tune
    assert all(make_sampler(tune, worker) for worker in range(4))


def test_the_seed_flag_is_checked_before_anything_runs(tmp_path, capsys):
    from ballot.cli import main

    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--seed", str(2**64), "--out", str(out)]) == 2
    assert "base.seed: must be in [-2**63, 2**64)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("key", [
    "train_dense.warmup_epochs", "prune.ballot.refine_train.warmup_epochs", "prune.ballot.class_weight_prior_images",
    "prune.ballot.objective_mcd_weight", "train_dense.lr", "prune.retrain.lr", "prune.safecompress.lr",
    "prune.fairscratch.lr", "data.imbalance_ratio", "tune.mcd_weight", "prune.safecompress.fair_loss_weight",
    "prune.safecompress.cwv_weight", "prune.fairscratch.fairness_weight", "tune.timeout_s",
])
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_float_settings_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got (inf|nan)$"):
        build(f"{key}={value}")


def test_the_threshold_keeps_its_documented_infinity_but_not_nan():
    assert build("prune.ballot.conflict_threshold=.inf").prune.ballot.conflict_threshold == float("inf")
    with pytest.raises(ConfigError, match="^prune.ballot.conflict_threshold: must be a finite number, got nan$"):
        build("prune.ballot.conflict_threshold=.nan")


def test_the_objective_weight_is_not_negative():
    with pytest.raises(ConfigError, match=r"^prune.ballot.objective_mcd_weight: must be >= 0, got -5.0$"):
        build("prune.ballot.objective_mcd_weight=-5")
