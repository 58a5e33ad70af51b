"""Per-layer share of one-shot global magnitude pruning (LTH's ranking) at density 0.05 on the dense MobileNetV2 of
long-tailed digits, seed 0, trained with the product's dense schedule: `python reports/heldout_arch/layers.py`.

Prints how many layers keep under a tenth of their uniform share (density x size) and the six lowest."""

from ballot import experiment
from ballot.config import apply_overrides, experiment_from_params, load_yaml
from ballot.masks import Mask, magnitude_scores

DENSITY = 0.05

cfg = experiment_from_params(apply_overrides(load_yaml("params.yaml"), [
    "base.dataset=digits", "base.model=mobilenet", "data.imbalance_ratio=10", "data.val_fraction=0.2", "base.seed=0"]))
data = experiment.prepare_data(cfg)
model, _, _ = experiment.train_dense(cfg, data, progress=False)
scores = magnitude_scores(model)
kept = Mask.top_k(scores, DENSITY).counts()
share = {name: kept[name] / (DENSITY * scores[name].numel()) for name in scores}
print(f"layers under a tenth of their uniform share: {sum(s < 0.1 for s in share.values())} of {len(share)}")
for name, value in sorted(share.items(), key=lambda item: item[1])[:6]:
    print(f"{name}: {kept[name]} of {scores[name].numel()} kept ({value:.3f} of the uniform share)")
