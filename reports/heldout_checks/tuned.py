"""Does a short Optuna study on validation improve Ballot on held-out data? `tuned.py OUT NAME --trials N -- FLAGS`

For each seed: Ballot at its defaults (`ballot prune`), a study of N trials (`ballot tune`, the default search
space and objective: validation accuracy - 0.5 x validation MCD), then Ballot with the study's best values; all three
on the same dense states. Writes OUT/NAME/seed<K>/{default,tune,tuned}/ and prints validation and test figures.
Test figures are read after the study chose; nothing here picks a value on them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

BALLOT = str(Path(sys.executable).parent / "ballot")


def _run(args: list[str]) -> None:
    subprocess.run([BALLOT, *args], check=True, stdout=subprocess.DEVNULL)


def _flags(best_params: Path) -> list[str]:
    params = yaml.safe_load(best_params.read_text()).get("params") or {}
    return [f for key, value in params.items() for f in ("--set", f"{key}={json.dumps(value)}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("name")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: ballot flags naming the data
    for seed in args.seeds:
        root = args.out / args.name / f"seed{seed}"
        common = [*flags, "--seed", str(seed), "--device", "cpu", "--dense", str(root / "dense")]
        if not (root / "default" / "metrics.json").is_file():
            _run(["prune", *common, "--out", str(root / "default")])
        if not (root / "tune" / "best_params.yaml").is_file():
            _run(["tune", *common, "--n-trials", str(args.trials), "--out", str(root / "tune")])
        tuned_flags = _flags(root / "tune" / "best_params.yaml")
        if not (root / "tuned" / "metrics.json").is_file():
            _run(["prune", *common, *tuned_flags, "--out", str(root / "tuned")])
        for arm in ("default", "tuned"):
            m = json.loads((root / arm / "metrics.json").read_text())
            print(f"{args.name} seed {seed} {arm:<8} val acc {m['val']['acc']:.4f} cwv {m['val']['cwv']:.5f} "
                  f"mcd {m['val']['mcd']:.4f} | test acc {m['acc']:.4f} cwv {m['cwv']:.5f} mcd {m['mcd']:.4f}"
                  + (f"  {' '.join(tuned_flags[1::2])}" if arm == "tuned" else ""), flush=True)


if __name__ == "__main__":
    main()
