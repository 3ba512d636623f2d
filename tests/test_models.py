"""The model registry: names, options, paper sizes, small inputs, forward and backward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from fastrefine.errors import UsageError
from fastrefine.models import create_model, list_models, min_input_size, model_info

ALL_MODELS = [
    "alexnet",
    "alexnet_bn",
    "darknet19",
    "mobilenet_v1",
    "mobilenet_v1_025",
    "mobilenet_v1_050",
    "mobilenet_v1_075",
    "resnet18",
    "resnet34",
    "resnet50",
    "small_resnet",
    "tiny_cnn",
    "vgg16",
    "vgg19",
]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_names_every_model_sorted():
    assert list_models() == ALL_MODELS


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_at_64px_channels_last(name):
    torch.manual_seed(0)
    num_classes = 7
    model = create_model(name, num_classes=num_classes).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.float().logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_darknet19_matches_the_paper_size_and_flops():
    info = model_info("darknet19", num_classes=1000, resolution=224)
    print(f"darknet19: {info['params']} parameters, {info['flops']} FLOPs at 224")
    assert abs(info["params"] - 20.8e6) / 20.8e6 < 0.01
    # The paper's "5.58 billion operations" at 224 count a multiply-add as two operations (Darknet's
    # own counter does: 2 * n * k * k * c * h * w), which is FlopCounterMode's convention too, so the
    # FlopCounterMode total compares directly (2.79 G multiply-adds). We measure 5,581,979,648.
    assert abs(info["flops"] - 5.58e9) / 5.58e9 < 0.05


def test_darknet19_layer_pattern():
    # Table 6 of the paper: 18 body convs plus the 1x1 classifier conv make the 19 conv layers.
    model = create_model("darknet19", num_classes=1000)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    body, head = convs[:-1], convs[-1]
    assert [c.out_channels for c in body] == [
        32, 64, 128, 64, 128, 256, 128, 256, 512, 256, 512, 256, 512, 1024, 512, 1024, 512, 1024,
    ]
    assert [c.kernel_size[0] for c in body] == [3, 3, 3, 1, 3, 3, 1, 3, 3, 1, 3, 1, 3, 3, 1, 3, 1, 3]
    assert all(c.bias is None for c in body)
    assert head.kernel_size == (1, 1) and head.bias is not None and head.out_channels == 1000
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    leaky = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(leaky) == 18 and all(m.negative_slope == 0.1 for m in leaky)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 18


def test_mobilenet_v1_has_the_paper_size_at_width_1():
    info = model_info("mobilenet_v1", num_classes=1000, resolution=224)
    print(f"mobilenet_v1: {info['params']} parameters, {info['flops']} FLOPs at 224")
    assert abs(info["params"] - 4.2e6) / 4.2e6 < 0.02


# MobileNet paper, Table 6 (224 px, 1000 classes): params in millions rounded to 0.1, mult-adds in millions.
@pytest.mark.parametrize(
    ("width", "alias", "params_m", "mult_adds_m"),
    [(1.0, "mobilenet_v1", 4.2, 569), (0.75, "mobilenet_v1_075", 2.6, 325),
     (0.5, "mobilenet_v1_050", 1.3, 149), (0.25, "mobilenet_v1_025", 0.5, 41)],
)
def test_mobilenet_v1_widths_match_the_paper(width, alias, params_m, mult_adds_m):
    info = model_info("mobilenet_v1", num_classes=1000, resolution=224, width=width)
    assert info == model_info(alias, num_classes=1000, resolution=224)
    assert abs(info["params"] / 1e6 - params_m) <= 0.05  # the paper rounds to 0.1 M
    # FlopCounterMode counts a multiply-add as 2 FLOPs; the paper counts mult-adds.
    assert abs(info["flops"] / 2 / 1e6 - mult_adds_m) / mult_adds_m < 0.01


def test_mobilenet_v1_is_depthwise_separable():
    model = create_model("mobilenet_v1", num_classes=10, width=0.5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 27  # stem + 13 x (depthwise + pointwise)
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert convs[0].out_channels == 16 and convs[-1].out_channels == 512


def test_flop_convention_against_a_known_figure():
    # torchvision lists ResNet-50 at 4.09 G multiply-adds at 224; FlopCounterMode gives twice that.
    info = model_info("resnet50", num_classes=1000, resolution=224)
    assert info["params"] == 25_557_032
    assert abs(info["flops"] / 2 - 4.09e9) / 4.09e9 < 0.01


def test_model_info_counts_by_hand_for_tiny_cnn():
    info = model_info("tiny_cnn", num_classes=10, resolution=32, width=4)
    # convs 3->4 @32, 4->8 @16, 8->16 @8, 16->32 @4 (3x3 each), then linear 32->10; 2 FLOPs per MAC.
    macs = 32 * 32 * 9 * 3 * 4 + 16 * 16 * 9 * 4 * 8 + 8 * 8 * 9 * 8 * 16 + 4 * 4 * 9 * 16 * 32 + 32 * 10
    assert info["flops"] == 2 * macs
    model = create_model("tiny_cnn", num_classes=10, width=4)
    assert info["params"] == _params(model)


def test_small_models_are_demo_sized():
    tiny = _params(create_model("tiny_cnn", num_classes=10))
    small = _params(create_model("small_resnet", num_classes=10))
    print(f"tiny_cnn: {tiny} parameters, small_resnet: {small} parameters (10 classes)")
    assert 50_000 <= tiny <= 200_000
    assert 300_000 <= small <= 1_000_000


def test_small_model_options_change_the_network():
    narrow = _params(create_model("tiny_cnn", num_classes=10, width=8))
    wide = _params(create_model("tiny_cnn", num_classes=10, width=32))
    assert narrow < _params(create_model("tiny_cnn", num_classes=10)) < wide
    deep = create_model("small_resnet", num_classes=10, blocks=[2, 2, 2])
    shallow = create_model("small_resnet", num_classes=10, blocks=(1, 1))
    assert _params(shallow) < _params(deep)
    assert deep(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes_sets_the_output_and_torchvision_options_pass_through():
    assert create_model("alexnet", num_classes=3, dropout=0.1).classifier[0].p == 0.1
    assert create_model("vgg16", num_classes=3, dropout=0.2).classifier[-1].out_features == 3
    resnet = create_model("resnet18", num_classes=5, zero_init_residual=True)
    assert resnet.fc.out_features == 5
    assert torch.count_nonzero(resnet.layer1[0].bn2.weight) == 0


def test_nothing_is_pretrained():
    # Two builds draw different random weights: nothing was loaded from a file.
    a = create_model("resnet18", num_classes=10)
    b = create_model("resnet18", num_classes=10)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)


def test_unknown_model_is_a_usage_error_listing_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown model 'darknet53'.*darknet19"):
        create_model("darknet53", num_classes=10)
    with pytest.raises(UsageError, match="unknown model"):
        model_info("nope", num_classes=10, resolution=32)


def test_unknown_option_names_model_and_option():
    with pytest.raises(UsageError, match=r"model 'darknet19' has no option 'width'; its options: none"):
        create_model("darknet19", num_classes=10, width=0.5)
    with pytest.raises(UsageError, match=r"'mobilenet_v1_025' has no option 'width'"):
        create_model("mobilenet_v1_025", num_classes=10, width=0.5)
    with pytest.raises(UsageError, match=r"'resnet50' has no option 'pretrained'"):
        create_model("resnet50", num_classes=10, pretrained=True)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mobilenet_v1", {"width": 0}, "option 'width' must be"),
        ("mobilenet_v1", {"width": "wide"}, "option 'width' must be"),
        ("tiny_cnn", {"width": 2.5}, "'width' is a channel count"),
        ("alexnet_bn", {"dropout": 1.0}, r"option 'dropout' must be a number in \[0, 1\)"),
        ("resnet34", {"zero_init_residual": "yes"}, "'zero_init_residual' must be true or false"),
        ("small_resnet", {"blocks": []}, "'blocks' must be a non-empty list"),
    ],
)
def test_bad_option_values_are_usage_errors(name, options, message):
    with pytest.raises(UsageError, match=message):
        create_model(name, num_classes=10, **options)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True, "10"])
def test_bad_num_classes_is_a_usage_error(num_classes):
    with pytest.raises(UsageError, match="num_classes must be a positive integer"):
        create_model("tiny_cnn", num_classes=num_classes)


def test_alexnet_at_32px_says_its_minimum_size():
    model = create_model("alexnet", num_classes=10).eval()
    with pytest.raises(UsageError, match=r"'alexnet' needs inputs of at least 63x63 pixels, got 32x32"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_minimum_input_size_is_exact(name):
    size = min_input_size(name)
    model = create_model(name, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)
        assert model(torch.randn(1, 3, size, size + 5)).shape == (1, 4)  # non-square is fine
        if size == 1:
            return
        with pytest.raises(UsageError, match=f"at least {size}x{size}"):
            model(torch.randn(1, 3, size - 1, size + 10))
        # The bound is tight: without the check, one pixel less breaks inside the network.
        model._forward_pre_hooks.clear()
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, size - 1, size - 1))


def test_models_with_the_size_check_copy_and_pickle():
    model = create_model("tiny_cnn", num_classes=3).eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(UsageError, match="at least 8x8"):
            clone(torch.randn(1, 3, 4, 4))
        assert clone(torch.randn(1, 3, 8, 8)).shape == (1, 3)


def test_size_check_adds_no_state():
    # Checkpoint keys stay torchvision's own, so torchvision-format weights load as they are.
    from torchvision.models import alexnet

    model = create_model("alexnet", num_classes=3)
    assert list(model.state_dict()) == list(alexnet(weights=None, num_classes=3).state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_on_cuda_bf16_channels_last(name):
    model = create_model(name, num_classes=10).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 10)
    out.float().logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
