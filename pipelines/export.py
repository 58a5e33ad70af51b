"""Stage export: the sparse model with masks baked in as ONNX (metadata inside), checked against PyTorch; compact
storage and the fairness-checked INT8 step as export.compact and export.quantize say."""

from __future__ import annotations

from ballot.config import ExperimentConfig
from ballot.experiment import load_pruned
from ballot.export import bake, export_checked, model_card
from ballot.quantize import gate_for
from ballot.snapshot import load_snapshot
from ballot.storage import atomic_save_tensors, staged_folder, write_json
from pipelines.common import DATA, EXAMPLE_FILE, EXPORT, METRICS, MODEL_FILE, PRUNE, REPORT_FILE, read_json, run_stage


def main(cfg: ExperimentConfig) -> None:
    data = load_snapshot(DATA)
    model, mask = load_pruned(PRUNE, cfg, data)
    card = model_card(read_json(METRICS), cfg, data.class_names, data.input_shape)
    inputs = data.test.x[:cfg.export.parity_samples]
    with staged_folder(EXPORT) as folder:
        report = export_checked(bake(model, mask), data.input_shape, folder / MODEL_FILE, card, inputs,
                                cfg.export.parity_tolerance, compact=cfg.export.compact,
                                granularity=getattr(cfg.prune, "granularity", "weight"),
                                quantization=gate_for(cfg.export, data))
        atomic_save_tensors({"input": data.test.x[:2]}, folder / EXAMPLE_FILE)
        write_json(folder / REPORT_FILE, report)
    parity = report["parity"]
    print(f"export: parity max |diff| {parity['max_abs_diff']:.2e} on {parity['samples']} inputs  "
          f"argmax agreement {parity['argmax_agreement']:.4f}  {report['onnx_format']} {report['onnx_bytes']} bytes "
          f"({report['onnx_bytes'] / report['dense_onnx_bytes']:.3f}x dense, "
          f"{report['onnx_bytes'] / report['lossless_floor_bytes']:.2f}x lossless floor) -> {EXPORT / MODEL_FILE}")
    if "quantization" in report:
        quant = report["quantization"]
        print(f"export: {quant['mode']} INT8 accuracy {quant['float']['acc']:.4f} -> {quant['int8']['acc']:.4f}, "
              f"CWV {quant['float']['cwv']:.5f} -> {quant['int8']['cwv']:.5f}")


if __name__ == "__main__":
    run_stage("export", main)
