"""LeNet-5 style (LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998).

Two 5×5 convolutions, each followed by ReLU and a 2×2 max-pool, then three fully connected layers (400 → 120 → 84 →
num_classes); no BatchNorm. Layer plan for a 32×32 input (channels, side)::

    conv1   5×5, padding 2, ReLU   →  6, 32
    maxpool 2×2                    →  6, 16
    conv2   5×5, padding 2, ReLU   → 16, 16
    maxpool 2×2                    → 16,  8
    adaptive average pool          → 16,  5     (16·5·5 = 400 features, whatever the image side)
    fc 400 → 120, ReLU; fc 120 → 84, ReLU; fc 84 → num_classes

Departures from the 1998 network, and why: "same" padding and the adaptive pool to 5×5 let it take images as small as
8×8 (8 → 4 → 2, then spread to 5×5) with the classic layer shapes, so the parameter count does not depend on the
image side (62,006 with 10 classes on 3 channels, as for the classic network on 32×32 colour images); ReLU and max
pooling in place of scaled tanh and trainable subsampling; a plain linear output instead of RBF units.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

#: Side of the feature map entering the first fully connected layer.
FEATURE_SIDE = 5


class LeNet5(nn.Module):
    """LeNet-5 style classifier (layer plan in the module docstring), PyTorch's default initialisation."""

    def __init__(self, *, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(FEATURE_SIDE),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * FEATURE_SIDE * FEATURE_SIDE, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("lenet", min_image_size=8)
def lenet(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 style: 62,006 parameters with 10 classes on 3 channels, for any image side >= 8."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
