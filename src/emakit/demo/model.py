"""The demo's models: a small CNN with BatchNorm for images, an MLP with BatchNorm for flat features.

BatchNorm gives the model float buffers (running statistics, averaged by the EMA) and an integer one
(``num_batches_tracked``, copied), so the demo exercises everything an EMA of a real model must handle.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "FeatureMLP", "build_model"]


class DigitsCNN(nn.Module):
    """Two 3×3 conv blocks (conv → BatchNorm → ReLU), pooled to 4×4, then a linear classifier.

    Sized for 8×8 digits (about 10k parameters); any image size works thanks to the adaptive pooling.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class FeatureMLP(nn.Module):
    """Linear → BatchNorm → ReLU → Linear, for inputs that are feature vectors rather than images."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The demo's model for inputs of ``input_shape`` (without the batch dimension).

    ``(C, H, W)`` gives a :class:`DigitsCNN`, ``(F,)`` a :class:`FeatureMLP`. Parameters are initialised
    from the global torch RNG, so seed it first for a reproducible model.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if len(input_shape) == 3:
        return DigitsCNN(input_shape[0], num_classes)
    if len(input_shape) == 1:
        return FeatureMLP(input_shape[0], num_classes)
    raise ValueError(f"input_shape must be (C, H, W) or (features,), got {input_shape}")
