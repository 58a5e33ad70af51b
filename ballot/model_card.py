"""The model card a reviewer reads: a markdown page rendered from the export's card and the per-class results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

INTENDED_USE = ("Image classification on inputs like the training data ({dataset}, shape {shape}). A research "
                "artefact of the ballot pipeline: check the per-class table before any use where one class's errors "
                "cost more than another's.")
CAVEATS = ("Pruning hurts classes unevenly. The figures are measured on the test split of the dataset named above; "
           "a class with few test samples has a noisy accuracy, and a shift in the class mix served (watch the "
           "service's predicted-class counters) changes the overall accuracy a user sees.")


def _known(value: Any) -> bool:
    """False for an accuracy without test samples: NaN, or null once read back from JSON."""
    return value is not None and value == value


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if _known(value) else "n/a"


def _change(row: Mapping[str, Any]) -> str:
    known = _known(row["sparse"]) and _known(row["dense"])
    return _number(100 * (row["sparse"] - row["dense"]) if known else None, "+.1f")


def render(card: Mapping[str, Any], per_class: Sequence[Mapping[str, Any]], file_bytes: int | None = None) -> str:
    """Markdown from an export card (ballot.export.model_card) and per-class rows (class, sparse, dense,
    test_samples: plots/per_class.json; an accuracy is null or NaN for a class without test samples)."""
    dense = card.get("dense_acc")
    acc = f"{card['acc']:.4f}" + (f" (dense {dense:.4f}, {100 * (card['acc'] - dense):+.1f} points)" if dense else "")
    measured = [row for row in per_class if _known(row["sparse"])]
    worst = min(measured, key=lambda row: row["sparse"]) if measured else None
    lines = [
        f"# Model card: {card['method']} / {card['model']} on {card['dataset']}", "",
        "## Intended use", "", INTENDED_USE.format(dataset=card["dataset"], shape=tuple(card["input_shape"])), "",
        "## Model", "",
        f"- architecture `{card['model']}`, pruned with `{card['method']}` to density {card['density']:.4f} "
        f"({100 * (1 - card['density']):.1f}% of the prunable weights removed)",
        *([f"- ONNX file: {file_bytes:,} bytes"] if file_bytes is not None else []),
        f"- classes: {', '.join(card['class_names'])}", "",
        "## Results (test split)", "",
        f"- accuracy {acc}",
        f"- class-wise variance (CWV) {card['cwv']:.5f}, max class difference (MCD) {card['mcd']:.4f}",
        *([f"- worst class: {worst['class']} at {worst['sparse']:.4f}"] if worst else []), "",
        "| class | accuracy | dense accuracy | change (points) | test samples |", "|---|---|---|---|---|",
        *(f"| {r['class']} | {_number(r['sparse'], '.4f')} | {_number(r['dense'], '.4f')} | {_change(r)} | "
          f"{r['test_samples']} |" for r in per_class), "",
        "## Fairness caveats", "", CAVEATS, "",
    ]
    return "\n".join(lines)
