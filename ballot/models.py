"""Model registry. Every model starts with a ``Standardize`` layer, so it takes raw [0, 1] inputs."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ballot.errors import ModelError


class Standardize(nn.Module):
    """(x - mean) / std with buffers that broadcast over one sample; exported with the model."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.unsqueeze(0).clone())
        self.register_buffer("std", std.unsqueeze(0).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _mlp(shape: Sequence[int], num_classes: int) -> nn.Module:
    """LeNet-300-100."""
    features = int(torch.tensor(shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))


def _cnn(shape: Sequence[int], num_classes: int) -> nn.Module:
    """Four 3x3 convolutions (32-32-64-64) with two max-pools, then a linear classifier."""
    channels = _image_channels(shape, "cnn")
    if min(int(d) for d in shape[1:]) < 4:
        raise ModelError(f"model 'cnn' needs images of at least 4x4 pixels (two 2x2 max-pools); the dataset gives "
                         f"shape {tuple(shape)}")

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    return nn.Sequential(*block(channels, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet20(shape: Sequence[int], num_classes: int) -> nn.Module:
    """CIFAR-style ResNet-20 (three stages of three basic blocks, 16-32-64 channels)."""
    channels = _image_channels(shape, "resnet20")
    layers: list[nn.Module] = [nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(3):
            layers.append(_BasicBlock(cin, cout, stride if block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


VGG_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


def _vgg(shape: Sequence[int], num_classes: int) -> nn.Module:
    """VGG-11 with BatchNorm, global average pooling and one linear classifier (small-input variant)."""
    cin = _image_channels(shape, "vgg")
    layers: list[nn.Module] = []
    for item in VGG_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
            cin = int(item)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _resnet18(shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-64 px inputs."""
    from torchvision.models import resnet18

    channels = _image_channels(shape, "resnet18")
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _mobilenet(shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision MobileNetV2 (depthwise-separable inverted residuals) with a stride-1 stem, for 8-64 px inputs."""
    from torchvision.models import mobilenet_v2

    channels = _image_channels(shape, "mobilenet")
    model = mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(channels, 32, 3, 1, 1, bias=False)
    return model


class _ViT(nn.Module):
    """A small vision transformer: square patches embedded by a strided convolution, a class token, learned
    positions, pre-norm encoder layers and a linear head on the class token."""

    def __init__(self, channels: int, size: tuple[int, int], patch: int, num_classes: int, width: int = 64,
                 depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, width, patch, patch)
        tokens = (size[0] // patch) * (size[1] // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.positions
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


def _vit(shape: Sequence[int], num_classes: int) -> nn.Module:
    """``_ViT`` with the largest of 4x4 and 2x2 patches that tile the image at least four to a side, else 1x1."""
    channels = _image_channels(shape, "vit")
    height, width = int(shape[1]), int(shape[2])
    patch = next((p for p in (4, 2) if height % p == 0 and width % p == 0 and min(height, width) >= 4 * p), 1)
    return _ViT(channels, (height, width), patch, num_classes)


class _LSTM(nn.Module):
    """A 2-layer LSTM over the steps of its input (an image's rows, or a sequence's steps) and a linear head on the
    last step's output. Its forget gates start open (input bias 1; Gers et al. 2000, Jozefowicz et al. 2015): with
    PyTorch's default initialisation, SGD at the product's learning rates left it at chance on a synthetic sequence
    set that it learns this way (reports/lstm_init/)."""

    def __init__(self, features: int, num_classes: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.recurrent = nn.LSTM(features, width, depth, batch_first=True)
        with torch.no_grad():
            for layer in range(depth):
                getattr(self.recurrent, f"bias_ih_l{layer}")[width:2 * width].fill_(1.0)  # gates i, f, g, o
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.transpose(1, 2).flatten(2) if x.dim() == 4 else x  # (batch, C, H, W) -> H steps of C x W
        return self.head(self.recurrent(steps)[0][:, -1])


def _lstm(shape: Sequence[int], num_classes: int) -> nn.Module:
    """``_LSTM`` reading an image (C, H, W) row by row, or a sequence (steps, features) step by step."""
    if len(shape) not in (2, 3):
        raise ModelError(f"model 'lstm' needs image (C, H, W) or sequence (steps, features) inputs; the dataset "
                         f"gives shape {tuple(shape)}")
    return _LSTM(int(shape[0]) * int(shape[2]) if len(shape) == 3 else int(shape[1]), num_classes)


def _image_channels(shape: Sequence[int], name: str) -> int:
    if len(shape) != 3:
        raise ModelError(f"model '{name}' needs image inputs (C, H, W); the dataset gives shape {tuple(shape)}")
    return int(shape[0])


MODELS: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet20": _resnet20,
    "vgg": _vgg,
    "resnet18": _resnet18,
    "mobilenet": _mobilenet,
    "vit": _vit,
    "lstm": _lstm,
}


def build_model(name: str, input_shape: Sequence[int], num_classes: int,
                mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> nn.Module:
    """Model ``name`` for inputs of ``input_shape`` (without batch) wrapped in a standardising first layer.

    ``mean`` and ``std`` hold one value per channel of an image, or per feature otherwise (``stats_shape``; see
    ``DataBundle.input_stats``), in any shape with that many elements; they default to the identity transform.
    """
    builder = model_builder(name)
    if num_classes < 1:
        raise ModelError(f"model '{name}' needs at least one class, got {num_classes}")
    stat_shape = stats_shape(input_shape)
    stats = {"mean": torch.zeros(stat_shape) if mean is None else mean,
             "std": torch.ones(stat_shape) if std is None else std}
    for label, values in stats.items():
        if values.numel() != math.prod(stat_shape):
            raise ModelError(f"model '{name}': {label} has {values.numel()} values; inputs of shape "
                             f"{tuple(input_shape)} need {math.prod(stat_shape)} (shape {stat_shape})")
    return nn.Sequential(Standardize(stats["mean"].reshape(stat_shape), stats["std"].reshape(stat_shape)),
                         builder(input_shape, num_classes))


def check_logits(name: str, model: nn.Module, inputs: torch.Tensor, num_classes: int) -> None:
    """ModelError unless ``model`` maps ``inputs`` (two training samples) to one tensor of logits, (2, num_classes),
    in training mode and in eval mode: not a tuple or a dict (return the logits alone; some torchvision models add
    auxiliary outputs while training) and not probabilities (a final softmax, on which cross-entropy barely trains).
    A forward pass that fails is named too. Moves the model's BatchNorm statistics; keeps its mode and leaves the
    global random stream where it was (Dropout draws from it)."""
    was_training = model.training
    for training in (True, False):
        mode = "training" if training else "eval"
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                outputs = model.train(training)(inputs)
        except Exception as error:  # noqa: BLE001  a user's forward can fail in any way; training would too
            raise ModelError(f"model '{name}' fails on two training samples in {mode} mode: "
                             f"{type(error).__name__}: {error}") from error
        if not isinstance(outputs, torch.Tensor):
            raise ModelError(f"model '{name}' returns a {type(outputs).__name__} in {mode} mode; its forward must "
                             f"return one tensor of logits, shape (batch, {num_classes})")
        if tuple(outputs.shape) != (len(inputs), num_classes):
            raise ModelError(f"model '{name}' returns shape {tuple(outputs.shape)} for a batch of {len(inputs)}; it "
                             f"must return logits of shape (batch, {num_classes}), one score per class")
        sums = outputs.sum(1)
        if num_classes > 1 and bool((outputs >= 0).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            raise ModelError(f"model '{name}' returns probabilities (non-negative rows that sum to 1); return the "
                             "logits before the softmax: the losses apply it themselves")
    model.train(was_training)


def model_builder(name: str) -> Callable[[Sequence[int], int], nn.Module]:
    """The registered builder for ``name``; ModelError listing the choices otherwise."""
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}'; choose from {sorted(MODELS)}")
    return MODELS[name]


def stats_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of normalisation statistics: per channel for images (C, 1, 1), per feature otherwise."""
    if len(input_shape) == 3:
        return (int(input_shape[0]), 1, 1)
    return tuple(int(d) for d in input_shape)
