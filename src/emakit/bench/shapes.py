"""The benchmark's models, built from torch modules (no downloads): the shapes an EMA update meets.

Large tensors (a ResNet-50-like conv net, a ViT-B-like transformer), where the update is memory traffic;
thousands of small tensors (2,000 ``Linear(15, 16)``), where per-tensor overhead dominates; and a 9-tensor
MLP, where the fixed cost of one call does.
"""

from __future__ import annotations

import torch
from torch import nn

from emakit.engine.naming import is_averaged

__all__ = [
    "MLP",
    "SHAPES",
    "ManyLinears",
    "ResNetLike",
    "ViTLike",
    "averaged_elements",
    "build_model",
    "demo_cnn",
    "describe",
    "tracked",
]

SHAPES = ("resnet", "vit", "many", "mlp")


class _Bottleneck(nn.Module):
    def __init__(self, in_ch: int, mid: int, stride: int) -> None:
        super().__init__()
        out = mid * 4
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down: nn.Module | None = None
        if stride != 1 or in_ch != out:
            self.down = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    """ResNet-50's layout (bottlenecks 3-4-6-3): 25.6M parameters in 161 tensors plus 159 BatchNorm buffers."""

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        in_ch = width
        for stage, depth in enumerate((3, 4, 6, 3)):
            mid = width * 2**stage
            for i in range(depth):
                blocks.append(_Bottleneck(in_ch, mid, 2 if i == 0 and stage > 0 else 1))
                in_ch = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class ViTLike(nn.Module):
    """ViT-B/16's layout: patch embedding, 12 pre-norm encoder layers of width 768: 86.6M parameters, 152 tensors."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, image: int = 224, patch: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class ManyLinears(nn.Module):
    """``count`` ``Linear(15, 16)`` side by side: 2 x ``count`` small tensors, per-tensor overhead dominates."""

    def __init__(self, count: int = 2000) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(15, 16) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x) for layer in self.layers]).sum(0)


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: 9 tensors (an integer buffer among them), 10k parameters."""

    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def demo_cnn() -> nn.Module:
    """The demo's CNN for 8x8 single-channel digits (about 10k parameters, two BatchNorm layers)."""
    from emakit.demo.model import DigitsCNN

    return DigitsCNN(in_channels=1, num_classes=10)


def build_model(shape: str, quick: bool = False) -> nn.Module:
    """The benchmark model for ``shape`` (one of :data:`SHAPES`); ``quick`` gives a small stand-in."""
    if shape == "resnet":
        return ResNetLike(width=8 if quick else 64)
    if shape == "vit":
        return ViTLike(dim=64, depth=2, heads=4) if quick else ViTLike()
    if shape == "many":
        return ManyLinears(count=200 if quick else 2000)
    if shape == "mlp":
        return MLP()
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")


def tracked(model: nn.Module) -> list[torch.Tensor]:
    """What emakit's EMA tracks: trainable parameters and all buffers."""
    return [p for p in model.parameters() if p.requires_grad] + list(model.buffers())


def averaged_elements(model: nn.Module) -> int:
    """How many floating elements an update blends."""
    return sum(t.numel() for t in tracked(model) if is_averaged(t))


def describe(model: nn.Module) -> str:
    """``'25.6M parameters in 161 tensors + 159 buffers'``."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    size = sum(p.numel() for p in params)
    amount = f"{size / 1e6:.1f}M" if size >= 100_000 else f"{size / 1e3:.1f}k"
    return f"{amount} parameters in {len(params)} tensors" + (f" + {len(buffers)} buffers" if buffers else "")
