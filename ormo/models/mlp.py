"""A multilayer perceptron on flattened images: the smallest non-convex model of the zoo.

``flatten → fc (in_channels·image_size² → 256), ReLU → fc (256 → 128), ReLU → fc (128 → num_classes)``, PyTorch's
default initialisation. The first layer holds most of the parameters and grows with the image area: 820,874 in all
for 10 classes on 32×32×3 images, 50,826 on 8×8×1.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

#: Widths of the hidden layers.
HIDDEN_WIDTHS: tuple[int, ...] = (256, 128)


class MLP(nn.Module):
    """Fully connected ReLU network over ``in_features`` inputs; accepts images (flattened) or flat vectors."""

    def __init__(self, *, in_features: int, num_classes: int, hidden: tuple[int, ...] = HIDDEN_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@register_model("mlp")
def mlp(*, num_classes: int, in_channels: int, image_size: int) -> MLP:
    """Two hidden layers (256, 128) on ``in_channels·image_size²`` inputs."""
    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes)


@register_model("mlp-small")
def mlp_small(*, num_classes: int, in_channels: int, image_size: int) -> MLP:
    """One hidden layer of 100 on ``in_channels·image_size²`` inputs: 79,510 parameters for Fashion-MNIST (LeNet-sized,
    at a fraction of a convolution's CPU cost; the Fashion-MNIST reproductions use it)."""
    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes, hidden=(100,))
