"""ballot.tuning.significance: the paired, class-stratified bootstrap and the noise guard on a study's choice."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from ballot.tuning.significance import (
    CORRECT_ATTR,
    describe_guard,
    guard_choice,
    pack_correct,
    unpack_correct,
    win_probability,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _rare_class_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0: 1000 images, the baseline gets 900 right, the challenger 897. Class 1: 2 images, the baseline gets
    the first right, the challenger both. On the full split the challenger scores higher (its MCD falls from 0.4 to
    0.103); on a resample it loses exactly when the baseline's two draws are both its correct image (1 in 4)."""
    labels = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    baseline = torch.cat([torch.arange(1000) < 900, torch.tensor([True, False])])
    challenger = torch.cat([torch.arange(1000) < 897, torch.tensor([True, True])])
    return labels, baseline, challenger


@pytest.mark.parametrize("length", [1, 7, 8, 9, 1001])
def test_packed_records_round_trip(length):
    correct = torch.rand(length, generator=torch.Generator().manual_seed(length)) < 0.5
    text = pack_correct(correct)
    assert isinstance(text, str) and len(text) <= 4 * ((length + 7) // 8 + 2) // 3 + 4
    assert torch.equal(unpack_correct(text, length), correct)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_correct(text, length + 8)


def test_one_rare_image_wins_three_resamples_in_four():
    labels, baseline, challenger = _rare_class_case()
    p = win_probability(baseline, challenger, labels, 2, mcd_weight=0.5)
    assert p == pytest.approx(0.75, abs=0.04)
    assert win_probability(baseline, challenger, labels, 2, mcd_weight=0.5) == p, "seeded: the same decision"
    assert win_probability(challenger, baseline, labels, 2, mcd_weight=0.5) == pytest.approx(0.25, abs=0.04)


def test_identical_records_never_win_and_a_clear_gain_always_does():
    labels = torch.arange(3000) % 3
    baseline = torch.arange(3000) < 2000  # classes 0-2 each 2/3 right
    assert win_probability(baseline, baseline.clone(), labels, 3, mcd_weight=0.5) == 0.0
    better = baseline | (torch.arange(3000) >= 2500)  # 500 more right, spread over all classes
    assert win_probability(baseline, better, labels, 3, mcd_weight=0.5) == 1.0
    assert win_probability(better, baseline, labels, 3, mcd_weight=0.5) == 0.0


def test_mismatched_records_are_refused():
    with pytest.raises(ValueError, match="correctness records of 3 and 4 samples for 3 labels"):
        win_probability(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool), torch.zeros(3), 1, 0.5)


def _study(records: dict[int, torch.Tensor | None], objectives: dict[int, float], feasible: bool = True,
           directions: tuple[str, ...] = ("maximize",)) -> optuna.Study:
    """A study whose trial 0 is the baseline; ``records`` gives each trial's per-sample record (None: none)."""
    study = optuna.create_study(directions=list(directions))
    for number, correct in records.items():
        attrs = {"baseline": number == 0, "feasible": feasible if number == 0 else True,
                 "objective": objectives[number]}
        if correct is not None:
            attrs[CORRECT_ATTR] = pack_correct(correct)
        values = [objectives[number]] * len(directions)
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=values, params={"x": float(number)},
                                     distributions={"x": FloatDistribution(0, 10)}, user_attrs=attrs))
    return study


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return max(study.trials, key=lambda t: t.values[0])


def test_guard_keeps_the_configured_values_when_the_win_rests_on_one_image():
    labels, baseline, challenger = _rare_class_case()
    study = _study({0: baseline, 1: challenger}, {0: 0.3, 1: 0.4})
    kept, record = guard_choice(study, _best(study), labels, 2, 0.5, min_confidence=0.9)
    assert kept.number == 0 and record["kept"] == "baseline" and record["challenger"] == 1
    assert record["win_probability"] == pytest.approx(0.75, abs=0.04)
    assert "only 7" in describe_guard(record) and "the configured values are kept" in describe_guard(record)
    kept, record = guard_choice(study, _best(study), labels, 2, 0.5, min_confidence=0.7)
    assert kept.number == 1 and record["kept"] == "challenger" and "chosen" in describe_guard(record)


@pytest.mark.parametrize("case", ["off", "baseline chosen", "baseline infeasible", "multi"])
def test_guard_compares_nothing_where_there_is_nothing_to_compare(case):
    labels, baseline, challenger = _rare_class_case()
    study = _study({0: baseline, 1: challenger}, {0: 0.3, 1: 0.4} if case != "baseline chosen" else {0: 0.5, 1: 0.4},
                   feasible=case != "baseline infeasible",
                   directions=("maximize", "minimize") if case == "multi" else ("maximize",))
    best = _best(study)
    kept, record = guard_choice(study, best, labels, 2, 0.5, min_confidence=0.0 if case == "off" else 0.9)
    assert kept is best and record is None and describe_guard(record) is None
    assert guard_choice(study, None, labels, 2, 0.5, 0.9) == (None, None)


def test_trials_without_a_record_keep_the_best_and_say_why():
    labels, baseline, challenger = _rare_class_case()
    study = _study({0: None, 1: challenger}, {0: 0.3, 1: 0.4})
    kept, record = guard_choice(study, _best(study), labels, 2, 0.5, min_confidence=0.9)
    assert kept.number == 1 and record["kept"] == "challenger" and "win_probability" not in record
    assert "no per-sample validation record" in describe_guard(record)
