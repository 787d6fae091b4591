"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2.

Depth ``6n + 2``: a 3×3 convolution to 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels
(the first block of stages 2 and 3 halves the resolution with stride 2), global average pooling and a linear
classifier. Every convolution is followed by BatchNorm; ReLU after the stem, inside each block and after each sum.

Shortcuts are the paper's parameter-free *option A*: where a block changes shape, the input is subsampled with the
block's stride and the extra channels are zeros. This gives the paper's sizes (resnet20 ≈ 0.27M parameters).
Adaptive average pooling makes the network accept any image side; the registry asks for at least 8 pixels (8 → 4 → 2
through the three stages).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ormo.rules.base import check_int_at_least

from .registry import register_model

#: Channels of the three stages (the stem has the first stage's width).
STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm right after has its own shift.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: keep every ``stride``-th pixel, then append ``extra_channels`` zero channels.

    Pixel ``i`` of the output is input pixel ``stride·i``, the centre of the strided 3×3 convolution's window, so
    both branches stay aligned for even and odd sides alike. Costs one padded copy of the activation.
    """

    def __init__(self, *, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad reads its widths from the last dimension backwards: (W, W, H, H, C before, C after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with two 3×3 convolutions (the first may be strided)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(stride=stride, extra_channels=out_channels - in_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, §4.2) with option-A shortcuts; ``n = blocks_per_stage``.

    Convolutions get Kaiming-normal weights (fan-out, ReLU gain), BatchNorm starts at scale 1 and shift 0, and the
    classifier keeps PyTorch's default uniform initialisation.
    """

    def __init__(self, *, blocks_per_stage: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        check_int_at_least("blocks_per_stage", blocks_per_stage, 1)
        width = STAGE_WIDTHS[0]
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        for stage, out_width in enumerate(STAGE_WIDTHS):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(width, out_width, stride=stride))
                width = out_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet20", min_image_size=8)
def resnet20(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-20 (n = 3): 269,722 parameters with 10 classes on 3 channels."""
    return CifarResNet(blocks_per_stage=3, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet32", min_image_size=8)
def resnet32(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-32 (n = 5): 464,154 parameters with 10 classes on 3 channels."""
    return CifarResNet(blocks_per_stage=5, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet56", min_image_size=8)
def resnet56(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-56 (n = 9): 853,018 parameters with 10 classes on 3 channels."""
    return CifarResNet(blocks_per_stage=9, num_classes=num_classes, in_channels=in_channels)
