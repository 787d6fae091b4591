"""The model zoo: shapes, exact parameter counts, gradients, seeding without global RNG side effects, and the registry.

Inputs are drawn from local generators and batches are tiny (2–4 images), so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ormo.models import build_model, min_image_size, model_names, register_model, registry
from ormo.models.resnet_cifar import PadShortcut
from ormo.rules.base import ConfigError

BUILT_IN = ["lenet", "mlp", "mlp-small", "resnet20", "resnet32", "resnet56", "squeezenet"]
BN_MODELS = {"resnet20", "resnet32", "resnet56", "squeezenet"}
RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}


def _images(batch: int, in_channels: int, image_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, image_size, image_size, generator=gen)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this file single-threaded: on 2–4-image batches intra-op threads buy nothing, and on a busy machine their
    spin-waiting made the file ~8× slower (3 s → 23 s). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made inside a test are dropped afterwards (the built-in models stay visible)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_every_built_in_model_is_registered():
    assert sorted(model_names()) == BUILT_IN


# ---------------------------------------------------------------------------------------------------------------
# shapes


# (in_channels, image_size, num_classes): CIFAR-like, the smallest side (1-channel 8×8), an odd side with 100 classes.
SHAPES = [(3, 32, 10), (1, 8, 10), (4, 13, 100)]


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize(("in_channels", "image_size", "num_classes"), SHAPES)
def test_output_is_one_logit_row_per_image(name, in_channels, image_size, num_classes):
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    out = model(_images(2, in_channels, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_min_image_sizes():
    assert {n: min_image_size(n) for n in BUILT_IN} == {
        "lenet": 8, "mlp": 1, "mlp-small": 1, "resnet20": 8, "resnet32": 8, "resnet56": 8, "squeezenet": 8,
    }


# ---------------------------------------------------------------------------------------------------------------
# parameter counts


def _resnet_param_count(blocks_per_stage: int, num_classes: int, in_channels: int = 3) -> int:
    """Count by hand: a 3×3 conv from c to d channels has 9·c·d weights (no bias), a BN over d channels 2·d, the
    option-A shortcut none, the classifier 64·classes + classes."""
    count = 9 * in_channels * 16 + 2 * 16  # stem conv + BN
    width = 16
    for out in (16, 32, 64):
        for _ in range(blocks_per_stage):
            count += 9 * width * out + 2 * out + 9 * out * out + 2 * out  # conv-BN-conv-BN
            width = out
    return count + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        # resnet20: stem 432 + 32; stage 1: 3 × (2·2304 + 2·32) = 14,016; stage 2: 13,952 (16 → 32 block) + 2 × 18,560;
        # stage 3: 55,552 (32 → 64 block) + 2 × 73,984; fc 650. Backbone 269,072 — the paper's "0.27M".
        ("resnet20", 10, 269_722),
        ("resnet20", 100, 275_572),  # + 90 more classes × 65
        # Each extra block per stage adds 4,672 + 18,560 + 73,984 = 97,216: backbone = 97,216·n − 22,576.
        ("resnet32", 10, 464_154),
        ("resnet32", 100, 470_004),
        ("resnet56", 10, 853_018),
        ("resnet56", 100, 858_868),
    ],
)
def test_resnet_parameter_counts(name, num_classes, expected):
    model = build_model(name, num_classes=num_classes)
    assert _num_params(model) == expected == _resnet_param_count(RESNET_BLOCKS[name], num_classes)


@pytest.mark.parametrize("name", sorted(RESNET_BLOCKS))
def test_resnet_depth_is_6n_plus_2(name):
    model = build_model(name, num_classes=10)
    weighted = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(weighted) == 6 * RESNET_BLOCKS[name] + 2


def test_squeezenet_parameter_count():
    # A fire module from c channels, squeeze s, expand e per branch: c·s + s·e + 9·s·e weights, BN 2·s + 2·(2e).
    def fire(c, s, e):
        return c * s + 10 * s * e + 2 * s + 4 * e

    fires = [fire(64, 16, 64), fire(128, 16, 64), fire(128, 32, 128), fire(256, 32, 128),
             fire(256, 48, 192), fire(384, 48, 192), fire(384, 64, 256), fire(512, 64, 256)]
    assert fires == [11_552, 12_576, 45_632, 49_728, 105_312, 111_456, 189_568, 197_760]
    stem = 9 * 3 * 64 + 2 * 64  # 1,856
    conv10 = 512 * 10 + 10  # 5,130
    assert stem + sum(fires) + conv10 == 730_570
    assert _num_params(build_model("squeezenet", num_classes=10)) == 730_570


def test_lenet_and_mlp_parameter_counts():
    # lenet: conv1 3·6·25 + 6 = 456, conv2 6·16·25 + 16 = 2,416, fc 400·120 + 120 = 48,120, 120·84 + 84 = 10,164,
    # 84·10 + 10 = 850; the same for every image side thanks to the adaptive pool.
    assert _num_params(build_model("lenet", num_classes=10)) == 62_006
    assert _num_params(build_model("lenet", num_classes=10, image_size=8)) == 62_006
    assert _num_params(build_model("lenet", num_classes=10, in_channels=1, image_size=8)) == 62_006 - 2 * 6 * 25
    # mlp: 3072·256 + 256 = 786,688, 256·128 + 128 = 32,896, 128·10 + 10 = 1,290.
    assert _num_params(build_model("mlp", num_classes=10)) == 820_874
    small = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    assert _num_params(small) == 64 * 256 + 256 + 32_896 + 1_290
    # mlp-small on Fashion-MNIST: 784·100 + 100 = 78,500, 100·10 + 10 = 1,010 (LeNet-sized)
    assert _num_params(build_model("mlp-small", num_classes=10, in_channels=1, image_size=28)) == 79_510


def test_option_a_shortcut_subsamples_and_appends_zero_channels():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    out = PadShortcut(stride=2, extra_channels=2)(x)
    assert out.shape == (1, 4, 3, 3)
    assert torch.equal(out[:, :2], x[:, :, ::2, ::2])  # pixels 0, 2, 4 of each row and column
    assert torch.equal(out[:, 2:], torch.zeros(1, 2, 3, 3))


# ---------------------------------------------------------------------------------------------------------------
# gradients and modes


@pytest.mark.parametrize("name", BUILT_IN)
def test_backward_reaches_every_parameter(name):
    model = build_model(name, num_classes=10)
    loss = nn.functional.cross_entropy(model(_images(2, 3, 32)), torch.tensor([3, 7]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_batchnorm_models_are_exactly_the_expected_ones():
    def has_bn(name):
        return any(isinstance(m, nn.BatchNorm2d) for m in build_model(name, num_classes=10).modules())

    assert {n for n in BUILT_IN if has_bn(n)} == BN_MODELS


@pytest.mark.parametrize("name", BUILT_IN)
def test_train_and_eval_modes(name):
    model = build_model(name, num_classes=10)
    assert model.training  # built in training mode
    x = _images(4, 3, 32)
    out_train = model(x)
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    if name in BN_MODELS:
        # Training mode normalises with the batch's statistics and moves the running ones; eval uses the running ones.
        first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert first_bn.num_batches_tracked.item() == 1
        assert not torch.equal(first_bn.running_mean, torch.zeros_like(first_bn.running_mean))
        assert not torch.allclose(out_train, out_eval)
    else:
        assert torch.equal(out_train, out_eval)  # no BN, no dropout: the mode changes nothing


# ---------------------------------------------------------------------------------------------------------------
# seeding


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", BUILT_IN)
def test_same_seed_same_parameters_different_seed_different_parameters(name):
    torch.manual_seed(1)
    a = _state(build_model(name, num_classes=10, seed=5))
    torch.manual_seed(2)  # the global state before the build must not matter
    b = _state(build_model(name, num_classes=10, seed=5))
    c = _state(build_model(name, num_classes=10, seed=6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


@pytest.mark.parametrize("name", BUILT_IN)
def test_build_leaves_the_global_rng_untouched(name):
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model(name, num_classes=10, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected_draw)


# ---------------------------------------------------------------------------------------------------------------
# registry errors and user models


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError,
                       match=r"unknown model 'resnet18' \(model.name\); valid names: .*resnet20.*squeezenet"):
        build_model("resnet18", num_classes=10)
    with pytest.raises(ConfigError, match=r"unknown model \['mlp'\]"):
        build_model(["mlp"], num_classes=10)


@pytest.mark.parametrize(
    ("field", "values", "constraint"),
    [
        ("num_classes", [1, 0, -3, 2.5, True, "10", None], "an integer >= 2"),
        ("in_channels", [0, -1, 3.0, False], "an integer >= 1"),
        ("seed", [-1, 2**64, 1.5, "0"], r"an integer in \[0, 2\*\*64\)"),
    ],
)
def test_invalid_argument_names_field_value_and_constraint(field, values, constraint):
    for value in values:
        kwargs = {"num_classes": 10, field: value}
        with pytest.raises(ConfigError, match=rf"invalid {field}: .* \(must be {constraint}\)") as info:
            build_model("mlp", **kwargs)
        assert repr(value) in str(info.value)


def test_num_classes_message_matches_the_project_format():
    with pytest.raises(ConfigError) as info:
        build_model("resnet20", num_classes=1)
    assert str(info.value) == "invalid num_classes: 1 (must be an integer >= 2)"


@pytest.mark.parametrize(
    ("name", "bad"), [("resnet20", 7), ("squeezenet", 4), ("lenet", 7), ("mlp", 0), ("lenet", 8.0)]
)
def test_image_size_below_the_model_minimum(name, bad):
    minimum = min_image_size(name)
    with pytest.raises(ConfigError) as info:
        build_model(name, num_classes=10, image_size=bad)
    assert str(info.value).startswith(
        f"invalid image_size: {bad!r} (must be an integer >= {minimum} for model {name!r}); resize or pad"
    )


def test_registering_a_name_twice_is_an_error(scratch_registry):
    with pytest.raises(ConfigError, match=r"model name 'resnet20' is already registered"):
        register_model("resnet20")(lambda **_: nn.Identity())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": ""}, r"invalid model name: '' \(must be a non-empty string\)"),
    ({"name": 3}, r"invalid model name: 3"),
    ({"name": "x", "min_image_size": 0}, r"invalid min_image_size: 0 \(must be an integer >= 1\)"),
])
def test_bad_registration_arguments(scratch_registry, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        register_model(**kwargs)


def test_factory_must_return_a_module(scratch_registry):
    register_model("not-a-model")(lambda **_: "oops")
    with pytest.raises(TypeError, match=r"factory of model 'not-a-model' returned str"):
        build_model("not-a-model", num_classes=10)


def test_user_model_round_trip(scratch_registry):
    seen = {}

    @register_model("linear-probe", min_image_size=4)
    def linear_probe(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        seen.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert linear_probe.__name__ == "linear_probe"  # the decorator hands the factory back unchanged
    assert model_names()[-1] == "linear-probe"
    model = build_model("linear-probe", num_classes=5, in_channels=2, image_size=4, seed=3)
    assert seen == {"num_classes": 5, "in_channels": 2, "image_size": 4}
    assert model(_images(3, 2, 4)).shape == (3, 5)
    assert _num_params(model) == 2 * 16 * 5 + 5
    again = build_model("linear-probe", num_classes=5, in_channels=2, image_size=4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"invalid image_size: 3 \(must be an integer >= 4 for model 'linear-probe'"):
        build_model("linear-probe", num_classes=5, image_size=3)
    with pytest.raises(ConfigError, match=r"already registered"):
        register_model("linear-probe")(linear_probe)

