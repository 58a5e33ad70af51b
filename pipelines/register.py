"""Stage register: one MLflow run for this pipeline execution, and the exported model as a new registered version."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ballot import tracking
from ballot.config import ExperimentConfig
from ballot.export import read_metadata
from ballot.storage import load_tensors, write_json, write_text
from pipelines.common import (
    BEST_PARAMS,
    CARD_FILE,
    DENSE,
    DVC_LOCK,
    EXAMPLE_FILE,
    EXPORT,
    METRICS,
    MODEL_CARD,
    MODEL_FILE,
    PARAMS,
    PLOTS,
    PRUNE,
    REGISTER,
    REPORT_FILE,
    read_json,
    run_stage,
)


def artifacts() -> list[tuple[Path, str]]:
    """(file, folder in the run's artifacts) for everything a run keeps besides the model."""
    files = [(PARAMS, "config"), (DVC_LOCK, "config"), (BEST_PARAMS, "config"), (PRUNE / "config.json", "config"),
             (METRICS, "evaluate"), (EXPORT / REPORT_FILE, "export"), (PRUNE / "mask_report.json", "prune"),
             (PRUNE / "details.json", "prune")]
    files += [(path, "plots") for path in sorted(PLOTS.glob("*")) if path.is_file()]
    return [(path, folder) for path, folder in files if path.is_file()]


def main(cfg: ExperimentConfig) -> None:
    metrics = read_json(METRICS)
    export_report = read_json(EXPORT / REPORT_FILE)
    card = read_metadata(EXPORT / MODEL_FILE)
    example = load_tensors(EXPORT / EXAMPLE_FILE, "input example")["input"].numpy()
    onnx_sha256 = tracking.file_sha256(EXPORT / MODEL_FILE)  # names the registered file in register.json
    tracking.connect(tracking.resolve_tracking_uri(cfg.register.tracking_uri))
    run_tags = {**tracking.git_state(), "onnx_sha256": onnx_sha256}
    if DVC_LOCK.is_file():
        run_tags["dvc_lock_sha256"] = tracking.file_sha256(DVC_LOCK)
    text = (EXPORT / CARD_FILE).read_text(encoding="utf-8")  # the export stage renders it beside the file
    # This stage, killed after its run ended and before register.json was written, registered this very file from
    # this very pipeline state: record that registration rather than register the file a second time.
    registration = tracking.find_registration(cfg.register.experiment, cfg.register.model_name, tracking.CHALLENGER,
                                              run_tags)
    if registration is not None:
        tracking.fail_orphan_runs()  # its run, killed after the alias moved, may still be RUNNING: it ends FINISHED
        print(f"register: version {registration.version} (run {registration.run_id}) already registers this file from "
              "this pipeline state; recording it", file=sys.stderr)
    else:  # the card goes to the run from a scratch folder; the stage's own files change only once it is registered
        with tempfile.TemporaryDirectory() as scratch:
            card_file = write_text(Path(scratch) / MODEL_CARD.name, text)
            registration = tracking.register_run(
                EXPORT / MODEL_FILE, cfg.register.model_name, example, card, experiment=cfg.register.experiment,
                tags=run_tags, artifacts=[*artifacts(), (card_file, "model")],
                histories={"dense": read_json(DENSE / "history.json"), "final": read_json(PRUNE / "history.json")},
                # the configuration prune actually ran with (params.yaml with the tuned values applied)
                params=tracking.flatten(read_json(PRUNE / "config.json")),
                metrics={**tracking.numeric_metrics(metrics), **tracking.numeric_metrics(export_report, "export.")})
    write_json(REGISTER, {**asdict(registration), "onnx_sha256": onnx_sha256})
    write_text(MODEL_CARD, text)
    print(f"register: {registration.name} version {registration.version} @{registration.alias}  "
          f"run {registration.run_id}  ({registration.tracking_uri})")


if __name__ == "__main__":
    run_stage("register", main)
