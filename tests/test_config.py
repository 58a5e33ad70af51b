import math
import re

import pytest
import yaml

from ballot.config import BallotConfig, PruneConfig, apply_overrides, experiment_from_params, from_dict, load_yaml
from ballot.errors import ConfigError


def test_defaults_build_and_nested_partial_groups_keep_their_own_defaults():
    cfg = experiment_from_params({"prune": {"ballot": {"refine_train": {"lr": 0.2}}}})
    assert cfg.prune.ballot.refine_train.lr == 0.2
    assert cfg.prune.ballot.refine_train.epochs == BallotConfig().refine_train.epochs


@pytest.mark.parametrize("params, message", [
    ({"base": {"densty": 0.1}}, r"base: unknown key\(s\) \['densty'\]"),
    ({"base": {"density": 1.5}}, r"base.density: must be in \(0, 1\], got 1.5"),
    ({"base": {"density": 0}}, r"base.density: must be in \(0, 1\]"),
    ({"base": {"seed": "zero"}}, "base.seed: expected an integer"),
    ({"prune": {"retrain": {"schedule": "linear"}}}, "prune.retrain.schedule: unknown 'linear'"),
    ({"prune": {"ballot": {"conflict_threshold": -1}}}, "prune.ballot.conflict_threshold: must be >= 0"),
    ({"prune": {"ballot": {"class_weight_prior_images": -2}}}, "prune.ballot.class_weight_prior_images: must be >= 0"),
    ({"prune": {"ballot": {"conflict": "maybe"}}}, r"prune.ballot.conflict: unknown 'maybe'"),
    ({"prune": {"ballot": {"rounds": 0}}}, "prune.ballot.rounds: must be >= 1"),
    ({"prune": {"final_train": "fancy"}}, r"prune.final_train: unknown 'fancy'"),
    ({"train_dense": {"rewind_fraction": 1.5}}, r"train_dense.rewind_fraction: must be in \[0, 1\]"),
    ({"bogus_group": {}}, r"unknown group\(s\) \['bogus_group'\]"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
    ({"base": 3}, "base: expected a group of keys, got 3"),
    ({"train_dense": {"schedule": "plateau"}}, "train_dense.schedule: 'plateau' needs a validation objective"),
    ({"prune": {"retrain": {"schedule": "plateau"}}}, "prune.retrain.schedule: 'plateau' needs"),
    ({"train_dense": {"momentum": -1}}, r"train_dense.momentum: must be in \[0, 1\)"),
    ({"prune": {"retrain": {"weight_decay": float("nan")}}}, "prune.retrain.weight_decay: must be a finite"),
])
def test_bad_params_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        experiment_from_params(params)


def test_pipeline_groups_are_part_of_the_config():
    cfg = experiment_from_params({"tune": {"n_trials": 3}, "register": {"model_name": "m"}})
    assert cfg.tune.n_trials == 3 and cfg.register.model_name == "m" and cfg.base.dataset == "fashion-mnist"


def test_yaml_infinity_and_exponent_strings():
    ballot = from_dict(BallotConfig, {"conflict_threshold": ".inf"}, "ballot")
    assert math.isinf(ballot.conflict_threshold)
    prune = from_dict(PruneConfig, {"retrain": {"weight_decay": "1e-4"}}, "prune")
    assert prune.retrain.weight_decay == 1e-4


def test_overrides_parse_yaml_values():
    params = apply_overrides({"base": {"seed": 1}}, ["base.density=0.1", "prune.ballot.rounds=2"])
    assert params == {"base": {"seed": 1, "density": 0.1}, "prune": {"ballot": {"rounds": 2}}}
    with pytest.raises(ConfigError, match="group.key=value"):
        apply_overrides({}, ["novalue"])
    assert apply_overrides({"data": None}, ["data.val_fraction=0.2"]) == {"data": {"val_fraction": 0.2}}
    for broken in ("tune.space=[1,", "base.density=: x"):
        with pytest.raises(ConfigError, match=r"override '.*': the value is not valid YAML \("):
            apply_overrides({}, [broken])
    with pytest.raises(ConfigError, match="'seed' is not a group"):
        apply_overrides({"base": {"seed": 1}}, ["base.seed.x=2"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


def test_a_key_given_twice_in_params_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  density: 0.1\n  density: 0.5\n")
    with pytest.raises(ConfigError, match="duplicate key 'density'"):
        load_yaml(path)


def test_params_with_odd_keys_get_config_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match="a key must be a string or a number"):
        load_yaml(path)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[1, 'foo'\]"):
        experiment_from_params({"base": {1: 2, "foo": 3}})
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \[1, 'x'\]"):
        experiment_from_params({1: {}, "x": {}})


def test_a_storage_url_with_a_port_that_is_no_number_is_a_config_error():
    with pytest.raises(ConfigError, match="tune.storage: 'postgresql://u@host:port/db' is not a database URL"):
        experiment_from_params({"tune": {"storage": "postgresql://u@host:port/db"}})


@pytest.mark.parametrize("tune, message", [
    ({"storage": "sqlite://"}, "tune.storage: 'sqlite://' is an in-memory database"),
    ({"storage": "sqlite:///:memory:"}, "is an in-memory database"),
    ({"study_name": " "}, "tune.study_name: must not be empty"),
    ({"study_name": "s" * 513}, "tune.study_name: at most 512 characters"),
])
def test_a_study_no_process_could_resume_or_store_is_refused(tune, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        experiment_from_params({"tune": tune})


def test_a_binary_params_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a text file"):
        load_yaml(path)


def test_yaml_merge_keys_work_as_in_safe_load_and_a_mappings_own_keys_override(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prune:\n  retrain: &train {lr: 0.1, epochs: 3}\n  ballot:\n    refine_train:\n      <<: *train\n"
                    "      epochs: 5\n")
    assert load_yaml(path) == yaml.safe_load(path.read_text())
    refine = experiment_from_params(load_yaml(path)).prune.ballot.refine_train
    assert (refine.lr, refine.epochs) == (0.1, 5)
    path.write_text("a: &a {x: 1}\np: {q: &b {<<: *a, x: 5}}\nc: {<<: [*b, *a], y: 2}\n")  # b flattened before built
    assert load_yaml(path) == yaml.safe_load(path.read_text())
    for text in ("a: &a {x: 1}\nc: {<<: *a, z: 3, z: 4}\n", "a: &a {x: 1, x: 2}\nc: {<<: *a}\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="duplicate key"):
            load_yaml(path)


def test_a_key_given_twice_in_an_override_is_an_error_as_in_a_file():
    with pytest.raises(ConfigError, match=r"^override 'data=\{val_fraction: 0.2, val_fraction: 0.3\}': the value is "
                                          r"not valid YAML \(duplicate key 'val_fraction'\)$"):
        apply_overrides({}, ["data={val_fraction: 0.2, val_fraction: 0.3}"])


@pytest.mark.parametrize("value", ["[" * 3000 + "]" * 3000, "{b: " * 3000 + "1" + "}" * 3000])
def test_yaml_nested_too_deeply_is_named(tmp_path, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"a: {value}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: nested too deeply to read$"):
        load_yaml(path)
    with pytest.raises(ConfigError, match=r"^override 'tune.space=.*': the value is nested too deeply to read$"):
        apply_overrides({}, [f"tune.space={value}"])


def test_an_unreadable_params_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("base: {}\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", refuse)
    with pytest.raises(ConfigError, match=r"params.yaml: cannot be read \(Permission denied\)$"):
        load_yaml(path)
