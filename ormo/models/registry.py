"""The model registry: a name maps to a factory and the smallest image side the network accepts.

A factory is any callable ``factory(*, num_classes, in_channels, image_size) -> nn.Module``. It may draw from
torch's default CPU generator freely (the default ``nn`` initialisers do): :func:`build_model` seeds that generator
from ``seed`` inside a forked RNG scope, so the same seed gives the same parameters and the caller's global RNG
state is left exactly as it was (habit 7: no global random state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from ormo.rules.base import ConfigError, check_int_at_least, invalid

#: Seeds accepted by torch's CPU generator.
SEED_LIMIT = 2**64


class ModelFactory(Protocol):
    """What :func:`register_model` decorates: builds a freshly initialised network for the given input/output."""

    def __call__(self, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module: ...


FactoryT = TypeVar("FactoryT", bound=ModelFactory)


@dataclass(frozen=True, slots=True)
class _Entry:
    factory: ModelFactory
    #: Smallest accepted image side (height = width), in pixels; smaller inputs would pool away to nothing.
    min_image_size: int


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, min_image_size: int = 1) -> Callable[[FactoryT], FactoryT]:
    """Decorator: register ``factory`` under ``name``; :func:`build_model` rejects images smaller than
    ``min_image_size`` pixels a side before calling it.

    Usage::

        @register_model("tiny", min_image_size=4)
        def tiny(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    A name can be registered once; a second registration raises :class:`ConfigError` (pick another name).
    """
    if not isinstance(name, str) or not name:
        raise invalid("model name", name, "a non-empty string")
    check_int_at_least("min_image_size", min_image_size, 1)

    def decorate(factory: FactoryT) -> FactoryT:
        if name in _REGISTRY:
            raise ConfigError(f"model name {name!r} is already registered; register the new model under another name")
        _REGISTRY[name] = _Entry(factory=factory, min_image_size=min_image_size)
        return factory

    return decorate


def model_names() -> list[str]:
    """Every registered model name, in registration order."""
    return list(_REGISTRY)


def _entry(name: Any) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name such as a list
        raise ConfigError(f"unknown model {name!r} (model.name); valid names: {', '.join(_REGISTRY)}") from None


def min_image_size(name: str) -> int:
    """The smallest image side (pixels) that the model registered as ``name`` accepts."""
    return _entry(name).min_image_size


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32, seed: int = 0
) -> nn.Module:
    """Build the model registered as ``name`` for ``in_channels``×``image_size``×``image_size`` inputs and
    ``num_classes`` logits, initialised deterministically from ``seed``.

    The model is built on the CPU in the default dtype, in training mode. Initialisation draws from torch's CPU
    generator seeded with ``seed`` inside ``torch.random.fork_rng``, so two builds with the same arguments have
    identical parameters and the global RNG state is unchanged afterwards. Unknown names and invalid arguments raise
    :class:`ConfigError` naming the field, the value and the constraint.
    """
    entry = _entry(name)
    check_int_at_least("num_classes", num_classes, 2)
    check_int_at_least("in_channels", in_channels, 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < entry.min_image_size:
        raise invalid(
            "image_size", image_size, f"an integer >= {entry.min_image_size} for model {name!r}",
            fix="resize or pad the images, or pick a model with a smaller minimum",
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < SEED_LIMIT):
        raise invalid("seed", seed, "an integer in [0, 2**64)")

    # Only the CPU generator is forked and seeded (not torch.manual_seed, which would also reseed every CUDA device
    # outside the fork); torch.device("cpu") keeps a caller's set_default_device from moving the draws elsewhere.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(seed)
        model = entry.factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory of model {name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model
