"""Dead-unit removal: physically drop the neurons and channels whose removal cannot change the model's outputs.

torch-pruning's DependencyGraph couples every layer a unit touches (the output channel of each producing conv or
linear layer, the matching BatchNorm entries, residual adds, the input channels of each consumer, flatten -> linear
index blocks). One coupled index is removed only when its removal is exact in every member of the group:

- *unread*: every consumer's weights on it are zero, so whatever it carries is multiplied by zero; or
- *dead*: every producer's output on it is exactly zero for every input. A producer (conv / linear, then its own
  BatchNorm and ReLU when they follow it directly) yields a constant when all its incoming weights are zero (the
  constant comes from the bias and BatchNorm) or when its BatchNorm scale is zero (the constant is the BN shift);
  the unit is dead when that constant is 0, or negative and clamped by the ReLU.

Every other op in the group must map zero to zero channel-wise (ReLU, the add of two tensors, pooling, mean,
reshape); a group with anything else is left alone. A constant non-zero unit could be folded into the next
layer's bias, but with padded convolutions that is not exact, so it stays.

A convolution keeps a multiple of ``channel_multiple`` (8) output channels (or all it had): ONNX Runtime's blocked
(NCHWc) kernels want aligned channel counts, and the `cnn` on 28x28 inputs ran batch 64 twice as slowly with 63 or
60 channels left of 64 as with all 64 (docs/deploy.md). Dead channels that stay are zeros the packing stores for
next to nothing.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from ballot.depgraph import dependency_graph
from ballot.masks import PRUNABLE_TYPES, classifier_layer

ZERO_PRESERVING_OPS = ("ReluBackward", "AddBackward", "MaxPool", "AvgPool", "MeanBackward", "TBackward")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def remove_dead_units(model: nn.Module, input_shape: Sequence[int],
                      channel_multiple: int = 8) -> tuple[nn.Module, dict[str, int]]:
    """A copy of eval-mode ``model`` without its dead or unread units (its parameters requiring grad), and the
    number removed per layer (output units of conv / linear layers; the classifier's outputs are never touched).
    Each layer keeps at least one, and a convolution a multiple of ``channel_multiple`` channels or all of them.
    The same whether ``model``'s parameters are frozen or it is called under ``torch.inference_mode``."""
    # the graph is traced through autograd: not under the caller's inference mode, and with every parameter
    # requiring grad (a frozen one would leave its layer out of the graph: nothing removed)
    with torch.inference_mode(False):
        model = copy.deepcopy(model).cpu().eval().requires_grad_(True)
        classifier = classifier_layer(model, input_shape)
        before = {name: m.weight.shape[0] for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
        graph = dependency_graph(model, input_shape)
        with torch.no_grad():
            for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=PRUNABLE_TYPES):
                root, handler = group[0].dep.target.module, group[0].dep.handler
                removable = _removable(graph, group)
                units = root.weight.shape[0]
                if len(removable) == units:
                    removable = removable[1:]  # a layer with no unit left would not export
                if isinstance(root, _CONVS):
                    kept = min(units, math.ceil((units - len(removable)) / channel_multiple) * channel_multiple)
                    removable = removable[:units - kept]
                if removable:
                    graph.get_pruning_group(root, handler, removable).prune()
    removed = {name: before[name] - m.weight.shape[0] for name, m in model.named_modules()
               if isinstance(m, PRUNABLE_TYPES) and before[name] != m.weight.shape[0]}
    return model, removed


def _removable(graph: object, group: object) -> list[int]:
    """Root indices of ``group`` whose removal is exact in every member (see the module docstring)."""
    producers, consumers, norms = [], [], []
    for item in group.items:  # type: ignore[attr-defined]
        module, handler = item.dep.target.module, item.dep.handler.__name__
        if isinstance(module, PRUNABLE_TYPES) and getattr(module, "groups", 1) == 1:
            (producers if handler == "prune_out_channels" else consumers).append(item)
        elif isinstance(module, _BATCHNORMS):
            norms.append(module)
        elif not (type(module).__name__ == "_ReshapeOp" or any(op in str(module) for op in ZERO_PRESERVING_OPS)):
            return []
        elif "AddBackward" in str(module) and len(graph.module2node[module].inputs) < 2:  # type: ignore[attr-defined]
            return []  # x + constant: a zero input is not a zero output
    chains = {id(p.dep.target.module): _chain(graph, p.dep.target.module) for p in producers}
    if any(not any(bn is norm for bn, _ in chains.values()) for norm in norms):
        return []  # a BatchNorm that follows no producer of the group: its shift could make a zero unit non-zero
    roots = list(group[0].root_idxs)  # type: ignore[index]
    unread = {root: True for root in roots}
    dead = {root: True for root in roots}
    for item in consumers:
        weight = item.dep.target.module.weight
        for idx, root in zip(item.idxs, item.root_idxs):
            unread[root] = unread[root] and not bool(weight[:, idx].any())
    for item in producers:
        module = item.dep.target.module
        bn, relu = chains[id(module)]
        for idx, root in zip(item.idxs, item.root_idxs):
            dead[root] = dead[root] and _outputs_zero(module, bn, relu, idx)
    return [root for root in roots if unread[root] or dead[root]]


def _chain(graph: object, producer: nn.Module) -> tuple[nn.Module | None, bool]:
    """The BatchNorm directly after ``producer`` (or None) and whether a ReLU directly follows the two."""
    node = graph.module2node[producer]  # type: ignore[attr-defined]
    bn = None
    if len(node.outputs) == 1 and isinstance(node.outputs[0].module, _BATCHNORMS):
        node = node.outputs[0]
        bn = node.module
    relu = len(node.outputs) == 1 and ("ReluBackward" in str(node.outputs[0].module)
                                       or isinstance(node.outputs[0].module, nn.ReLU))
    return bn, relu


def _outputs_zero(layer: nn.Module, bn: nn.Module | None, relu: bool, unit: int) -> bool:
    """Whether output ``unit`` of ``layer`` (then ``bn``, then a ReLU when ``relu``) is 0 for every input."""
    weights_zero = not bool(layer.weight[unit].any())
    scale_zero = bn is not None and bn.affine and float(bn.weight[unit]) == 0.0
    if not (weights_zero or scale_zero) or (bn is not None and bn.running_mean is None):
        return False
    value = torch.zeros(1) if layer.bias is None else layer.bias[unit:unit + 1].float()
    if bn is not None:
        shift = bn.bias[unit:unit + 1] if bn.affine else torch.zeros(1)
        if scale_zero:
            value = shift
        else:
            scale = bn.weight[unit:unit + 1] if bn.affine else torch.ones(1)
            value = (value - bn.running_mean[unit]) / torch.sqrt(bn.running_var[unit] + bn.eps) * scale + shift
    if relu:
        value = value.clamp_min(0)
    return float(value) == 0.0
