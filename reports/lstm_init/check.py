"""The `lstm` model's forget-gate initialisation, on a synthetic sequence set: `python reports/lstm_init/check.py OUT`.

The set: 1,500 sequences of 20 steps and 4 features, 5 classes; class c is a sine of frequency 0.15 (c + 1) per step
with a random phase, plus Gaussian noise of standard deviation 0.5 on every feature. The dense `lstm` is trained
with the product's default dense schedule (SGD, params.yaml's train_dense) twice on the same seed: as shipped
(forget-gate input bias 1) and with that bias drawn as PyTorch initialises it, U(-1/sqrt(128), 1/sqrt(128)).
Prints validation and test accuracy of each."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ballot import experiment, models  # noqa: E402
from ballot.config import apply_overrides, experiment_from_params, load_yaml  # noqa: E402
from ballot.fairness import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def sequences(path: Path) -> None:
    rng = np.random.default_rng(0)
    count, steps, features, classes = 1500, 20, 4, 5
    labels = rng.integers(0, classes, count)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    t = np.arange(steps)[None, :, None]
    x = np.sin(0.15 * (1 + labels)[:, None, None] * t + phase) + 0.5 * rng.standard_normal((count, steps, features))
    np.savez(path, x=x.astype(np.float32), y=labels)


def pytorch_forget_bias(shape, num_classes):
    model = models._lstm(shape, num_classes)
    width = model.recurrent.hidden_size
    with torch.no_grad():
        for layer in range(model.recurrent.num_layers):
            getattr(model.recurrent, f"bias_ih_l{layer}")[width:2 * width].uniform_(-width ** -0.5, width ** -0.5)
    return model


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sequences(out / "sequences.npz")
    models.MODELS["lstm-pytorch-init"] = pytorch_forget_bias
    params = {k: v for k, v in load_yaml(REPO / "params.yaml").items() if k in ("base", "data", "train_dense")}
    for name in ("lstm", "lstm-pytorch-init"):
        cfg = experiment_from_params(apply_overrides(params, [
            "base.dataset=npz", f"data.path={out / 'sequences.npz'}", f"base.model={name}", "base.device=cpu"]))
        data = experiment.prepare_data(cfg)
        model, _, _ = experiment.train_dense(cfg, data, progress=False)
        val = evaluate(model, data.val.x, data.val.y, data.num_classes)
        test = evaluate(model, data.test.x, data.test.y, data.num_classes)
        print(f"{name:<18} dense validation accuracy {val['acc']:.4f}  test accuracy {test['acc']:.4f}")


if __name__ == "__main__":
    main()
