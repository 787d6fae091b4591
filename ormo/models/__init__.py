"""The model zoo: small image classifiers built by name, deterministically from a seed.

::

    model = ormo.models.build_model("resnet20", num_classes=10, in_channels=3, image_size=32, seed=0)

Registered models: ``resnet20``, ``resnet32``, ``resnet56`` (He et al. 2016, CIFAR variants), ``squeezenet``
(v1.1-style fire modules with BatchNorm, for 32×32), ``lenet`` (LeNet-5 style, images >= 8×8), ``mlp`` and
``mlp-small``. Add your own with :func:`register_model`. Importing this package registers the built-in models.
"""

from . import lenet, mlp, resnet_cifar, squeezenet_cifar  # noqa: F401  (registration side effects)
from .lenet import LeNet5
from .mlp import MLP
from .registry import ModelFactory, build_model, min_image_size, model_names, register_model
from .resnet_cifar import CifarResNet
from .squeezenet_cifar import CifarSqueezeNet

__all__ = [
    "MLP",
    "CifarResNet",
    "CifarSqueezeNet",
    "LeNet5",
    "ModelFactory",
    "build_model",
    "min_image_size",
    "model_names",
    "register_model",
]
