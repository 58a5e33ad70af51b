"""The markdown model card, rendered from a hand-made export card and per-class rows."""

from __future__ import annotations

from ballot.model_card import render

CARD = {"method": "ballot", "model": "mlp", "dataset": "digits", "density": 0.05, "acc": 0.9, "dense_acc": 0.95,
        "cwv": 0.00123, "mcd": 0.2, "worst_class": 0.8, "class_names": ["zero", "one"], "input_shape": [1, 8, 8]}
ROWS = [{"class": "zero", "sparse": 1.0, "dense": 1.0, "test_samples": 36},
        {"class": "one", "sparse": 0.8, "dense": 0.9, "test_samples": 37}]


def test_the_card_states_use_model_results_per_class_and_caveats():
    text = render(CARD, ROWS, file_bytes=12345)
    for heading in ("# Model card: ballot / mlp on digits", "## Intended use", "## Results (test split)",
                    "## Fairness caveats"):
        assert heading in text
    assert "density 0.0500 (95.0% of the prunable weights removed)" in text
    assert "ONNX file: 12,345 bytes" in text
    assert "accuracy 0.9000 (dense 0.9500, -5.0 points)" in text
    assert "worst class: one at 0.8000" in text
    assert "| one | 0.8000 | 0.9000 | -10.0 | 37 |" in text and "| zero | 1.0000 | 1.0000 | +0.0 | 36 |" in text
    assert "shape (1, 8, 8)" in text


def test_without_a_dense_reference_or_file_size_the_card_says_less():
    card = {k: v for k, v in CARD.items() if k != "dense_acc"}
    text = render(card, ROWS)
    assert "accuracy 0.9000\n" in text and "ONNX file" not in text


def test_a_class_without_test_samples_is_shown_as_unknown_and_never_the_worst():
    rows = [*ROWS, {"class": "two", "sparse": None, "dense": None, "test_samples": 0},
            {"class": "three", "sparse": float("nan"), "dense": 0.5, "test_samples": 0}]
    text = render({**CARD, "class_names": ["zero", "one", "two", "three"]}, rows)
    assert "| two | n/a | n/a | n/a | 0 |" in text and "| three | n/a | 0.5000 | n/a | 0 |" in text
    assert "worst class: one at 0.8000" in text
