"""Stage prepare: load the configured dataset once and snapshot its seeded splits (versioned by DVC)."""

from __future__ import annotations

from ballot.config import ExperimentConfig, data_identity, to_dict
from ballot.experiment import prepare_data
from ballot.snapshot import save_snapshot
from ballot.storage import staged_folder
from pipelines.common import DATA, run_stage


def main(cfg: ExperimentConfig) -> None:
    data = prepare_data(cfg)
    for line in data.notes:  # the snapshot keeps the data, not the loader's notes
        print(line)
    provenance = {"dataset": cfg.base.dataset, "seed": cfg.base.seed, "data": data_identity(to_dict(cfg.data))}
    with staged_folder(DATA) as folder:
        save_snapshot(data, folder, provenance)
    print(f"prepare: {cfg.base.dataset}  train {len(data.train)}  val {len(data.val)}  test {len(data.test)}  "
          f"classes {data.num_classes} -> {DATA}")


if __name__ == "__main__":
    run_stage("prepare", main)
