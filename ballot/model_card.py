"""The model card a reviewer reads: a markdown page rendered from the export's card and the per-class results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

INTENDED_USE = ("Image classification on inputs like the training data ({dataset}, shape {shape}). A research "
                "artefact of the ballot pipeline: check the per-class table before any use where one class's errors "
                "cost more than another's.")
CAVEATS = ("Pruning hurts classes unevenly. The figures are measured on the test split of the dataset named above; "
           "a class with few test samples has a noisy accuracy, and a shift in the class mix served (watch the "
           "service's predicted-class counters) changes the overall accuracy a user sees.")


def render(card: Mapping[str, Any], per_class: Sequence[Mapping[str, Any]], file_bytes: int | None = None) -> str:
    """Markdown from an export card (ballot.export.model_card) and per-class rows (class, sparse, dense,
    test_samples: plots/per_class.json)."""
    dense = card.get("dense_acc")
    acc = f"{card['acc']:.4f}" + (f" (dense {dense:.4f}, {100 * (card['acc'] - dense):+.1f} points)" if dense else "")
    worst = min(per_class, key=lambda r: r["sparse"]) if per_class else None
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
        *(f"| {r['class']} | {r['sparse']:.4f} | {r['dense']:.4f} | {100 * (r['sparse'] - r['dense']):+.1f} | "
          f"{r['test_samples']} |" for r in per_class), "",
        "## Fairness caveats", "", CAVEATS, "",
    ]
    return "\n".join(lines)
