"""Per-layer kept share (of the uniform share density x size) of one-shot global magnitude (LTH's ranking) and of
Ballot's blend budget, on the dense MobileNetV2 of long-tailed digits, seed 0 (the product's dense schedule)."""
import torch
from ballot import experiment
from ballot.config import apply_overrides, experiment_from_params, load_yaml
from ballot.masks import Mask, magnitude_scores, shared_counts, blended_shares, budget
cfg = experiment_from_params(apply_overrides(load_yaml("params.yaml"), ["base.dataset=digits", "base.model=mobilenet",
      "data.imbalance_ratio=10", "data.val_fraction=0.2", "base.seed=0"]))
data = experiment.prepare_data(cfg)
model, dense, _ = experiment.train_dense(cfg, data, progress=False)
scores = magnitude_scores(model)
total = sum(s.numel() for s in scores.values())
ticket = Mask.top_k(scores, 0.05).counts()
shapes = {n: tuple(s.shape) for n, s in scores.items()}
ratios = {n: ticket[n] / (0.05 * scores[n].numel()) for n in scores}
worst = sorted(ratios.items(), key=lambda kv: kv[1])[:6]
print("global top-5% of theta_T: layers below 0.1 of uniform share:", sum(r < 0.1 for r in ratios.values()), "of", len(ratios))
print("lowest:", [(n, round(r, 3), ticket[n], scores[n].numel()) for n, r in worst])
print("zero-kept layers:", sum(ticket[n] == 0 for n in scores))
