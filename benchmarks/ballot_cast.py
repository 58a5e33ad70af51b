"""Seconds per Ballot ballot (each layer votes for its largest surviving |w|) with the linear-time selection
(``ballot.masks.top_positions``) against a stable descending sort, the rule it replaced, on the same weights.

Both give the same votes (checked here on every layer); they alternate, so background load hits both alike, and the
ratio sort / selection is printed from this one run. A ballot is cast every observation epoch, and on a small
training split ``min_steps`` stretches those epochs (125 on 435 images), so the cast cost adds up on large models.

    python benchmarks/ballot_cast.py --model vgg --density 0.37 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ballot.masks import magnitude_scores, top_positions
from ballot.models import build_model


def sorted_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` of a stable descending sort (the reference)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return chosen


def ballot_seconds(layers: list[tuple[torch.Tensor, int]], rule) -> tuple[float, list[torch.Tensor]]:
    started = time.perf_counter()
    votes = [rule(scores, k) for scores, k in layers]
    return time.perf_counter() - started, votes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--input", default="3,32,32", help="input shape C,H,W")
    parser.add_argument("--density", type=float, default=0.37, help="survivors' share (0.05 ** (1/3): round 2)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, tuple(int(v) for v in args.input.split(",")), 10)
    scores = {name: s.flatten() for name, s in magnitude_scores(model).items()}
    survivors = [s[torch.rand(s.numel()) < args.density] for s in scores.values()]  # |w| of a round's survivors
    layers = [(s, max(1, int(0.8 * s.numel()))) for s in survivors]  # each keeps 80% of them next round
    sort_s, select_s = [], []
    for _ in range(args.repeats):
        seconds, reference = ballot_seconds(layers, sorted_top)
        sort_s.append(seconds)
        seconds, votes = ballot_seconds(layers, top_positions)
        select_s.append(seconds)
        assert all(torch.equal(a, b) for a, b in zip(reference, votes)), "the two rules must cast the same votes"
    weights = sum(s.numel() for s in survivors)
    sort_m, select_m = statistics.median(sort_s), statistics.median(select_s)
    print(f"{args.model}: {len(layers)} layers, {weights:,} surviving weights, median of {args.repeats} ballots")
    print(f"stable sort  {sort_m:.3f} s a ballot")
    print(f"selection    {select_m:.3f} s a ballot")
    print(f"speed-up     {sort_m / select_m:.1f}x (same votes)")


if __name__ == "__main__":
    main()
