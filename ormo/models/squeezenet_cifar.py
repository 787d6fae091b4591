"""SqueezeNet (Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size",
2016) with v1.1 fire modules, adapted to 32×32 images and given BatchNorm (the OrLoMo paper's networks have BN).

Layer plan for a 32×32 input (channels, side); every convolution but the last is followed by BatchNorm and ReLU::

    conv1   3×3, stride 1           →  64, 32     (ImageNet v1.1: 3×3 stride 2, then pool: 4× smaller at once)
    maxpool 2×2, stride 2           →  64, 16
    fire2   squeeze 16, expand 64+64 → 128, 16
    fire3   squeeze 16, expand 64+64 → 128, 16
    maxpool 2×2, stride 2           → 128,  8
    fire4   squeeze 32, expand 128+128 → 256, 8
    fire5   squeeze 32, expand 128+128 → 256, 8
    maxpool 2×2, stride 2           → 256,  4
    fire6   squeeze 48, expand 192+192 → 384, 4
    fire7   squeeze 48, expand 192+192 → 384, 4
    fire8   squeeze 64, expand 256+256 → 512, 4
    fire9   squeeze 64, expand 256+256 → 512, 4
    conv10  1×1 → num_classes (with bias; no BN, no ReLU: its outputs are the logits)
    global average pool             → num_classes

A fire module is ``s = relu(bn(squeeze1x1(x)))``, then ``relu(bn(cat(expand1x1(s), expand3x3(s))))``. With 10
classes on 3 channels this has 730,570 parameters. Departures from v1.1, and why: no early downsampling (32 pixels
leave no room for it); BatchNorm in place of conv biases; no dropout before conv10 (its mask would be drawn from the
global RNG at every forward, and BN already regularises); no ReLU on the logits. The pools use ``ceil_mode`` so an
odd side keeps its last row; the registry asks for at least 8 pixels (8 → 4 → 2 → 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model

#: (squeeze channels, expand channels per branch) of fire2 … fire9, and where the max-pools sit.
FIRE_PLAN: tuple[tuple[int, int] | str, ...] = (
    "pool", (16, 64), (16, 64), "pool", (32, 128), (32, 128), "pool", (48, 192), (48, 192), (64, 256), (64, 256),
)
STEM_WIDTH = 64


class Fire(nn.Module):
    """Squeeze with a 1×1 convolution, expand with parallel 1×1 and 3×3 convolutions, concatenate the two."""

    def __init__(self, in_channels: int, *, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, kernel_size=1, bias=False)
        self.squeeze_bn = nn.BatchNorm2d(squeeze)
        self.expand1x1 = nn.Conv2d(squeeze, expand, kernel_size=1, bias=False)
        self.expand3x3 = nn.Conv2d(squeeze, expand, kernel_size=3, padding=1, bias=False)
        # One BN over the concatenation: the same as one BN per branch, in a single call.
        self.expand_bn = nn.BatchNorm2d(2 * expand)
        self.relu = nn.ReLU(inplace=True)

    @property
    def out_channels(self) -> int:
        return self.expand_bn.num_features

    def forward(self, x: Tensor) -> Tensor:
        s = self.relu(self.squeeze_bn(self.squeeze(x)))
        out = torch.cat([self.expand1x1(s), self.expand3x3(s)], dim=1)
        return self.relu(self.expand_bn(out))


class CifarSqueezeNet(nn.Module):
    """SqueezeNet v1.1-style for small images, with BatchNorm (layer plan in the module docstring).

    Convolutions feeding BN get Kaiming-normal weights (fan-in, ReLU gain); the classifying conv10 starts from
    N(0, 0.01²) weights and zero bias, as in the SqueezeNet reference implementation, so the first logits are small.
    """

    def __init__(self, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, STEM_WIDTH, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_WIDTH),
            nn.ReLU(inplace=True),
        ]
        width = STEM_WIDTH
        for step in FIRE_PLAN:
            if step == "pool":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                squeeze, expand = step
                fire = Fire(width, squeeze=squeeze, expand=expand)
                layers.append(fire)
                width = fire.out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.classifier(self.features(x))).flatten(1)


@register_model("squeezenet", min_image_size=8)
def squeezenet(*, num_classes: int, in_channels: int, image_size: int) -> CifarSqueezeNet:
    """SqueezeNet v1.1-style with BN for 32×32 images: 730,570 parameters with 10 classes on 3 channels."""
    return CifarSqueezeNet(num_classes=num_classes, in_channels=in_channels)
