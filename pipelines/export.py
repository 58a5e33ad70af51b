"""Stage export: the sparse model with masks baked in as ONNX (metadata inside), checked against PyTorch; compact
storage and the fairness-checked INT8 step as export.compact and export.quantize say."""

from __future__ import annotations

from ballot import model_card
from ballot.config import ExperimentConfig
from ballot.experiment import load_pruned
from ballot.export import describe, export_run, read_metadata
from ballot.snapshot import load_snapshot
from ballot.storage import atomic_save_tensors, staged_folder, write_json, write_text
from pipelines.common import (CARD_FILE, DATA, EXAMPLE_FILE, EXPORT, METRICS, MODEL_FILE, PLOTS, PRUNE, REPORT_FILE,
                              read_json, run_stage)


def main(cfg: ExperimentConfig) -> None:
    data = load_snapshot(DATA)
    model, mask = load_pruned(PRUNE, cfg, data)
    with staged_folder(EXPORT) as folder:
        report = export_run(model, mask, data, cfg, read_json(METRICS), folder / MODEL_FILE)
        atomic_save_tensors({"input": data.test.x[:2]}, folder / EXAMPLE_FILE)
        write_json(folder / REPORT_FILE, report)
        # beside the file, where `ballot serve` finds it for a plain .onnx path; register logs the same card
        write_text(folder / CARD_FILE, model_card.render(read_metadata(folder / MODEL_FILE),
                                                         read_json(PLOTS / "per_class.json"),
                                                         (folder / MODEL_FILE).stat().st_size))
    print("\n".join(describe(report)) + f" -> {EXPORT / MODEL_FILE}")


if __name__ == "__main__":
    run_stage("export", main)
