"""The Mask value type: which prunable weights survive.

A Mask maps prunable parameter names (conv and linear weights by default) to boolean tensors of the
same shape. Budgets are met exactly: ``Mask.top_k`` keeps precisely ``round(density * total)``
weights. A structured mask also *pins* other parameters (biases, normalisation scales and shifts) of the units it
removes, so that a removed unit's output is exactly zero; pinned entries are enforced like weights but do not count
toward the density. Masks are saved as safetensors, never pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ballot.config import check_density
from ballot.errors import MaskError
from ballot.storage import atomic_save_tensors, load_tensors

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PINNED_PREFIX = "pinned:"  # key prefix of pinned entries in a saved mask


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean vector marking the ``k`` largest entries of the 1-D ``scores`` (all when ``k`` reaches its length),
    ties going to the earlier position: the first ``k`` of a stable descending sort, found in linear time by a
    k-th-value selection, as a ballot is cast every epoch on layers of millions of weights."""
    n = scores.numel()
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise MaskError("scores hold NaN, which ranks nowhere (did training diverge?)")
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return chosen
    if k >= n:
        return ~chosen
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    chosen = scores > threshold
    tied = torch.nonzero(scores == threshold).flatten()
    chosen[tied[:k - int(chosen.sum())]] = True
    return chosen


RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)  # their weight_* matrices are prunable, gates together
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")  # nn.MultiheadAttention's


def first_owner_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's name by identity: a tensor several modules share (tied) goes under its first owner's name, the
    one ``named_parameters`` gives it."""
    return {id(param): name for name, param in model.named_parameters()}


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the weight parameters of every linear and convolutional layer, the input projections of every
    attention layer (its output projection is a linear layer) and the weight matrices of every recurrent layer and
    cell (nn.RNN, nn.LSTM, nn.GRU and their cells: weight_ih_l0, weight_hh_l0, ...; not their biases), in module
    order. A weight several modules share (tied) is listed once, under the name ``named_parameters`` gives it (its
    first owner's). MaskError naming a layer whose weight is computed rather than held (weight_norm, parametrize)."""
    first_name = first_owner_names(model)
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            keys = ["weight"]
        elif isinstance(module, nn.MultiheadAttention):
            keys = [key for key in ATTENTION_WEIGHTS if getattr(module, key) is not None]
        elif isinstance(module, RECURRENT_TYPES):
            keys = [key for key, _ in module.named_parameters(recurse=False) if key.startswith("weight_")]
        else:
            continue
        for key in keys:
            held = first_name.get(id(getattr(module, key)))
            if held is None:
                raise MaskError(f"layer '{name}' computes its {key} (a parametrization such as weight_norm) instead "
                                "of holding it as a parameter; remove the parametrization to prune it")
            if held not in names:
                names.append(held)
    return names


def unpruned_parameters(model: nn.Module) -> dict[str, int]:
    """The size of every parameter no method prunes, by name: biases, normalisation layers, and every parameter of a
    layer type ``prunable_names`` does not know (an embedding, a custom nn.Parameter)."""
    prunable = set(prunable_names(model))
    return {name: p.numel() for name, p in model.named_parameters() if name not in prunable}


def classifier_layer(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """The prunable layer a forward pass calls last: the classifier, whose outputs are the classes. Not the last in
    module order, which differs where a model defines its head before its body."""
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, *_: called.append(module))
             for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    device = next(model.parameters(), torch.empty(0)).device
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape, device=device))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    if not called:
        raise MaskError("the model calls no linear or convolutional layer")
    return called[-1]


def budget(total: int, density: float) -> int:
    """Number of weights kept at ``density`` (at least one)."""
    check_density(density)
    return max(1, min(total, round(density * total)))


def erk_counts(shapes: Mapping[str, Sequence[int]], density: float, floor: float = 0.0,
               min_per_layer: int = 1, capacity: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per-layer kept counts under the Erdos-Renyi-Kernel rule (Evci et al. 2020, RigL), exactly the global budget.

    A layer's density is proportional to sum(shape) / prod(shape) (for a conv weight (out, in, kh, kw) that is
    (out + in + kh + kw) / (out * in * kh * kw)), so small layers keep more of their weights and no large layer is
    starved; floors and caps as in ``shared_counts``.
    """
    return shared_counts(shapes, erk_shares(shapes), density, floor, min_per_layer, capacity)


def erk_shares(shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Each layer's unscaled ERK density, sum(shape) / prod(shape)."""
    return {name: sum(int(d) for d in shape) / math.prod(int(d) for d in shape) for name, shape in shapes.items()}


def ticket_shares(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, float]:
    """Each layer's density in the global top-k of ``scores`` at ``density`` (one-shot LTH's per-layer counts: ties
    at the threshold go to the earlier position, as in ``Mask.top_k``, so the counts sum to the budget)."""
    counts = Mask.top_k(scores, density, min_per_layer=0).counts()
    return {name: counts[name] / s.numel() for name, s in scores.items()}


def larger_shares(shapes: Mapping[str, Sequence[int]], scores: Mapping[str, torch.Tensor], density: float,
                  floor: float = 0.0, min_per_layer: int = 1) -> dict[str, float]:
    """Each layer's larger density of its ERK count and its share of the global top-k of ``scores`` at ``density``.

    Both sets of counts sum to the budget, so ``shared_counts`` scales these densities by at least one half: before
    floors and rounding every layer keeps at least half of what either rule alone would give it.
    """
    erk, ticket = _erk_and_ticket_densities(shapes, scores, density, floor, min_per_layer)
    return {name: max(erk[name], ticket[name]) for name in shapes}


def blended_shares(shapes: Mapping[str, Sequence[int]], scores: Mapping[str, torch.Tensor], density: float,
                   floor: float = 0.0, min_per_layer: int = 1) -> dict[str, float]:
    """Each layer's mean of its ERK density and its share of the global top-k of ``scores`` at ``density``.

    Both sets of counts sum to the budget, so their mean does too and needs no rescaling: every layer keeps at least
    half of what either rule alone would give it, and a layer on whose count the two rules agree keeps that count.
    """
    erk, ticket = _erk_and_ticket_densities(shapes, scores, density, floor, min_per_layer)
    return {name: (erk[name] + ticket[name]) / 2 for name in shapes}


def _erk_and_ticket_densities(shapes: Mapping[str, Sequence[int]], scores: Mapping[str, torch.Tensor],
                              density: float, floor: float, min_per_layer: int
                              ) -> tuple[dict[str, float], dict[str, float]]:
    """Each layer's density under ERK (with its floors) and in the global top-k of ``scores`` at ``density``."""
    erk = erk_counts(shapes, density, floor, min_per_layer)
    return ({name: erk[name] / math.prod(int(d) for d in shape) for name, shape in shapes.items()},
            ticket_shares(scores, density))


def shared_counts(shapes: Mapping[str, Sequence[int]], shares: Mapping[str, float], density: float,
                  floor: float = 0.0, min_per_layer: int = 1, capacity: Mapping[str, int] | None = None
                  ) -> dict[str, int]:
    """Per-layer kept counts with densities proportional to ``shares``, summing exactly to the global budget.

    Layers whose density would exceed 1 stay dense, and every layer keeps at least ``floor`` x its uniform share
    (``floor * density * size``) and ``min_per_layer`` weights; the other layers share what is left in proportion.
    ``capacity`` caps a layer's count (e.g. at what a candidate subnetwork holds); the budget is over all sizes.
    """
    full = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    sizes = {name: min(full[name], capacity[name]) if capacity else full[name] for name in full}
    raw = {name: max(0.0, float(shares[name])) for name in full}
    keep = budget(sum(full.values()), density)
    if sum(sizes.values()) < keep:
        raise MaskError(f"the layers' capacity ({sum(sizes.values())}) is below the budget of {keep}")
    if keep < len(sizes):
        raise MaskError(f"the budget of {keep} weights is below one weight for each of the {len(sizes)} layers: "
                        "raise the density")
    # every layer keeps at least one weight (_round_to_total), and a floor is met once rounded down
    low = {n: min(sizes[n], max(floor * density * full[n], min_per_layer, 1)) for n in sizes}
    needed = sum(math.floor(value + 1e-9) for value in low.values())
    if needed > keep:
        raise MaskError(f"layer floors need {needed} weights, more than the budget of {keep} at density {density}: "
                        "lower the floor or min_per_layer, or raise the density")
    fixed: dict[str, float] = {}  # layers clamped to their floor or to their size
    while True:
        free = [n for n in sizes if n not in fixed]
        weight = sum(raw[n] * full[n] for n in free)
        scale = (keep - sum(fixed.values())) / weight if weight > 0 else 0.0
        want = {n: scale * raw[n] * full[n] for n in free}
        over = {n: float(sizes[n]) for n in free if want[n] > sizes[n]}
        under = {n: low[n] for n in free if want[n] < low[n]}
        if not over and not under:
            break
        # Fix only the side that is sure to stay clamped: capping more than the floors take back raises the others'
        # scale, so a layer now under its floor may rise above it (and the other way round); fixing both at once
        # could overrun the budget.
        excess = sum(want[n] - sizes[n] for n in over)
        deficit = sum(low[n] - want[n] for n in under)
        fixed.update(over if excess > deficit else under if deficit > excess else {**over, **under})
    wanted = {n: fixed[n] if n in fixed else scale * raw[n] * full[n] for n in sizes}
    return _round_to_total(wanted, sizes, keep)


def _round_to_total(wanted: Mapping[str, float], sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Integer counts close to ``wanted`` (largest remainders round up), each within [1, size], summing to ``total``
    (at least one weight per layer: ``shared_counts`` checks)."""
    counts = {n: min(sizes[n], max(1, math.floor(w))) for n, w in wanted.items()}
    by_remainder = sorted(wanted, key=lambda n: (-(wanted[n] - math.floor(wanted[n])), n))
    while sum(counts.values()) != total:
        step = 1 if sum(counts.values()) < total else -1
        for name in by_remainder if step > 0 else reversed(by_remainder):
            if sum(counts.values()) == total:
                break
            if 1 <= counts[name] + step <= sizes[name]:
                counts[name] += step
    return counts


@dataclass(frozen=True)
class LayerReport:
    """Kept and total weights of one masked parameter."""

    name: str
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total


class Mask(Mapping[str, torch.Tensor]):
    """Validated {parameter name: bool tensor} over the prunable weights, plus optional ``pinned`` entries (other
    parameters held at zero where False, not counted in the density)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pinned: Mapping[str, torch.Tensor] | None = None) -> None:
        if not tensors:
            raise MaskError("a mask needs at least one tensor")
        self._tensors, self.pinned = _bool_tensors(tensors), _bool_tensors(pinned or {})
        overlap = set(self._tensors) & set(self.pinned)
        if overlap:
            raise MaskError(f"mask entries {sorted(overlap)} are both weights and pinned")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @classmethod
    def ones_like(cls, model: nn.Module) -> "Mask":
        """A mask that keeps every prunable weight."""
        params = dict(model.named_parameters())
        return cls({name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_names(model)})

    @classmethod
    def top_k(cls, scores: Mapping[str, torch.Tensor], density: float, min_per_layer: int = 1) -> "Mask":
        """Keep the highest-scoring weights globally, exactly ``budget(total, density)`` of them.

        Each layer first keeps its own ``min_per_layer`` best weights (so no layer dies); the rest of the
        budget goes to the best remaining scores network-wide. Ties go to the earlier position, so the
        result is deterministic.
        """
        names = list(scores)
        sizes = [scores[n].numel() for n in names]
        total = sum(sizes)
        keep = budget(total, density)
        flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
        if not torch.isfinite(flat).all():
            raise MaskError("scores must be finite")
        floors = sum(min(size, min_per_layer) for size in sizes)
        if floors > keep:
            raise MaskError(f"{len(sizes)} layers x min_per_layer {min_per_layer} need {floors} weights, more than "
                            f"the budget of {keep} at density {density}: lower prune.min_per_layer or raise the density")
        chosen = torch.zeros(total, dtype=torch.bool)
        start = 0
        for size in sizes:
            chosen[start:start + size] = top_positions(flat[start:start + size], min(size, min_per_layer))
            start += size
        remaining = keep - int(chosen.sum())
        if remaining > 0:
            free = ~chosen
            chosen[free] = top_positions(flat[free], remaining)
        tensors, start = {}, 0
        for name, size in zip(names, sizes):
            tensors[name] = chosen[start:start + size].reshape(scores[name].shape)
            start += size
        return cls(tensors)

    @classmethod
    def top_k_per_layer(cls, scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> "Mask":
        """Keep the ``counts[name]`` highest-scoring weights of each layer (ties go to the earlier position)."""
        tensors = {}
        for name, score in scores.items():
            flat = score.detach().flatten().float().cpu()
            if not torch.isfinite(flat).all():
                raise MaskError("scores must be finite")
            if not 0 <= counts[name] <= flat.numel():
                raise MaskError(f"layer '{name}' cannot keep {counts[name]} of its {flat.numel()} weights")
            tensors[name] = top_positions(flat, counts[name]).reshape(score.shape)
        return cls(tensors)

    def counts(self) -> dict[str, int]:
        """Kept weights per layer."""
        return {name: int(t.sum()) for name, t in self._tensors.items()}

    @property
    def kept(self) -> int:
        return sum(int(t.sum()) for t in self._tensors.values())

    @property
    def total(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def density(self) -> float:
        """Fraction of masked weights kept."""
        return self.kept / self.total

    def sparsity(self) -> float:
        """Fraction of masked weights pruned."""
        return 1.0 - self.density()

    def report(self) -> list[LayerReport]:
        """Kept / total per layer."""
        return [LayerReport(name, int(t.sum()), t.numel()) for name, t in self._tensors.items()]

    def is_subset_of(self, other: "Mask") -> bool:
        """True when every weight kept here is also kept by ``other``."""
        return set(self) == set(other) and all(not bool((self[n] & ~other[n]).any()) for n in self)

    def entries(self) -> dict[str, torch.Tensor]:
        """Every enforced entry: the weights' and the pinned ones."""
        return {**self._tensors, **self.pinned}

    def validate(self, model: nn.Module) -> None:
        """Raise MaskError unless every entry names a parameter of ``model`` with the same shape."""
        params = dict(model.named_parameters())
        for name, tensor in self.entries().items():
            if name not in params:
                raise MaskError(f"mask entry '{name}' is not a parameter of the model")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise MaskError(f"mask entry '{name}' has shape {tuple(tensor.shape)}, "
                                f"the parameter has {tuple(params[name].shape)}")

    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights (and pinned entries) of ``model`` in place."""
        self.validate(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.entries().items():
                params[name].mul_(tensor.to(params[name].device, params[name].dtype))

    def on(self, model: nn.Module) -> "BoundMask":
        """Bind to ``model`` for fast enforcement inside a training loop."""
        return BoundMask(self, model)

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors (uint8 tensors; pinned entries under PINNED_PREFIX)."""
        stored = {**self._tensors, **{PINNED_PREFIX + n: t for n, t in self.pinned.items()}}
        atomic_save_tensors({n: t.to(torch.uint8).contiguous() for n, t in stored.items()}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        """Read a mask written by ``save``; MaskError or StorageError name what is wrong."""
        path = Path(path)
        tensors = load_tensors(path, "mask")
        for name, tensor in tensors.items():
            if tensor.dtype not in (torch.uint8, torch.bool) or (tensor.numel() and int(tensor.max()) > 1):
                raise MaskError(f"{path}: entry '{name}' is not a 0/1 tensor")
        pinned = {n[len(PINNED_PREFIX):]: t for n, t in tensors.items() if n.startswith(PINNED_PREFIX)}
        return cls({n: t for n, t in tensors.items() if not n.startswith(PINNED_PREFIX)}, pinned)

    def to_bytes(self) -> bytes:
        """Canonical byte form (names sorted, pinned entries after the weights, each with its group and shape), for
        determinism checks and hashing: two masks give the same bytes only when they are equal."""
        return b"".join(f"{tag}:{name}:{tuple(group[name].shape)}:".encode() + group[name].numpy().tobytes()
                        for tag, group in (("w", self._tensors), ("p", self.pinned)) for name in sorted(group))


def _bool_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    checked = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise MaskError(f"mask entry '{name}' is not a tensor")
        checked[name] = tensor.detach().to(device="cpu", dtype=torch.bool)
    return checked


class BoundMask:
    """A mask resolved to a model's parameter tensors: zeroes weights and gradients cheaply."""

    def __init__(self, mask: Mask, model: nn.Module) -> None:
        mask.validate(model)
        params = dict(model.named_parameters())
        self.pairs = [(params[n], t.to(params[n].device, params[n].dtype)) for n, t in mask.entries().items()]

    @torch.no_grad()
    def zero_weights(self) -> None:
        """Set every pruned weight to exactly zero."""
        for param, keep in self.pairs:
            param.mul_(keep)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradients of pruned weights (so momentum and weight decay never move them)."""
        for param, keep in self.pairs:
            if param.grad is not None:
                param.grad.mul_(keep)


def magnitude_scores(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """|w| for each prunable weight."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs().cpu() for n in (names or prunable_names(model))}


def density_schedule(target: float, rounds: int) -> list[float]:
    """Densities after each of ``rounds`` equal-ratio pruning rounds ending exactly at ``target``."""
    check_density(target)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [target ** ((r + 1) / rounds) if r + 1 < rounds else target for r in range(rounds)]

