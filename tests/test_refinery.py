import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrefine.models import create_model
from fastrefine.refinery import NoRefinery, Refinery, kl_batchmean, make_loss, soft_cross_entropy


def test_soft_cross_entropy_against_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    p = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    # by hand: -sum_c p_c log softmax(s)_c per row, then the mean over the 2 rows (batchmean)
    rows = []
    for srow, prow in zip(s.tolist(), p.tolist()):
        z = math.log(sum(math.exp(v) for v in srow))
        rows.append(-sum(pc * (sc - z) for sc, pc in zip(srow, prow)))
    assert soft_cross_entropy(s, p).item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_kl_is_soft_ce_minus_entropy_and_zero_at_match():
    torch.manual_seed(0)
    s, r = torch.randn(4, 10), torch.randn(4, 10)
    p = F.softmax(r, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert kl_batchmean(s, p).item() == pytest.approx((soft_cross_entropy(s, p) - entropy).item(), abs=1e-5)
    assert kl_batchmean(r, p).item() == pytest.approx(0.0, abs=1e-6)
    # same gradient with respect to the student
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    soft_cross_entropy(s1, p).backward()
    kl_batchmean(s2, p).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_one_hot_target_equals_cross_entropy():
    torch.manual_seed(1)
    s, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert soft_cross_entropy(s, F.one_hot(y, 7).float()).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_make_loss_variants():
    torch.manual_seed(2)
    s, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    p = F.softmax(torch.randn(3, 4), 1)
    assert make_loss(refined=False)(s, None, y).item() == pytest.approx(F.cross_entropy(s, y).item())
    assert make_loss(refined=False, label_smoothing=0.1)(s, None, y).item() == pytest.approx(
        F.cross_entropy(s, y, label_smoothing=0.1).item())
    assert make_loss(refined=True)(s, p, y).item() == pytest.approx(soft_cross_entropy(s, p).item())
    mixed = make_loss(refined=True, gt_weight=0.25)(s, p, y).item()
    assert mixed == pytest.approx(0.75 * soft_cross_entropy(s, p).item() + 0.25 * F.cross_entropy(s, y).item())


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    net.train()
    for _ in range(3):  # give BN non-trivial running statistics
        net(torch.randn(8, 3, 8, 8) * 3 + 1)
    return net


def test_refinery_is_frozen_eval_and_gives_probabilities():
    ref = Refinery(_bn_net(), bn="eval")
    x = torch.randn(6, 3, 8, 8)
    ref.train()  # must not switch the refinery back to train mode
    p1, p2 = ref(x), ref(x)
    assert torch.equal(p1, p2)  # eval mode: no dropout, running statistics
    assert torch.allclose(p1.sum(1), torch.ones(6), atol=1e-5)
    assert all(not p.requires_grad for p in ref.parameters())
    # the probabilities can be used in a loss that needs backward (not inference tensors)
    s = torch.randn(6, 5, requires_grad=True)
    soft_cross_entropy(s, p1).backward()
    assert s.grad is not None


def test_refinery_batch_bn_uses_batch_stats_and_keeps_running_stats():
    net = _bn_net()
    bn = net[1]
    before = bn.running_mean.clone()
    ref = Refinery(net, bn="batch")
    x = torch.randn(6, 3, 8, 8)
    p = ref(x)
    assert torch.equal(bn.running_mean, before)       # running stats untouched
    assert bn.training and not net[3].training         # BN in batch mode, dropout off
    assert torch.equal(p, ref(x))                      # deterministic (no dropout)
    eval_p = Refinery(_bn_net(), bn="eval")(x)
    assert not torch.allclose(p, eval_p)               # batch statistics differ from running ones


def test_no_refinery_returns_none():
    assert NoRefinery()(torch.zeros(1, 3, 4, 4)) is None


def test_refinery_on_real_model_in_channels_last():
    m = create_model("tiny_cnn", num_classes=10).to(memory_format=torch.channels_last)
    ref = Refinery(m)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = ref(x)
    assert p.dtype == torch.float32 and p.shape == (2, 10)


def _with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["darknet19", "mobilenet_v1_025", "resnet18", "resnet50", "alexnet_bn",
                                  "tiny_cnn", "small_resnet"])
def test_eval_refinery_folds_batchnorm_into_convs_and_computes_the_same(name):
    torch.manual_seed(0)
    plain = _with_running_stats(create_model(name, num_classes=10)).to(memory_format=torch.channels_last)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())  # alexnet_bn: 2d and 1d
    ref = Refinery(plain)
    assert n_bn > 0 and ref.note == f"folded {n_bn} of {n_bn} BatchNorm layers into the layers before them"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.model.modules())
    convs = [m for m in ref.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert all(not p.requires_grad for p in ref.parameters())
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept = Refinery(copy.deepcopy(plain), fold_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.model.modules())
    with torch.inference_mode():
        want, got = plain(x), ref.model(x)
    scale = float(want.abs().max())
    assert scale > 0 and float((want - got).abs().max()) <= 1e-4 * scale  # same function, float rounding
    assert torch.allclose(ref(x), kept(x), atol=1e-5)                    # and the same probabilities


def test_batch_mode_refinery_never_folds():
    net = _bn_net()
    ref = Refinery(net, bn="batch")
    assert ref.model is net and "kept" in ref.note


def _real_crops(demo_tree, n: int = 6) -> torch.Tensor:
    """n real Fashion-MNIST photos at 32 px, normalised as the loaders do, channels-last."""
    import numpy as np
    from PIL import Image

    from fastrefine.loaders import IMAGENET_MEAN, IMAGENET_STD
    files = sorted((demo_tree / "train").glob("*/*"))[::40][:n]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]) / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("resolution", [48, 16])
def test_refinery_resolution_is_the_model_on_the_resized_crop(demo_tree, resolution):
    torch.manual_seed(0)
    model = create_model("small_resnet", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = _real_crops(demo_tree)
    ref = Refinery(copy.deepcopy(model), fold_bn=False, resolution=resolution)
    resized = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        want = F.softmax(model(resized), dim=1)
        unresized = F.softmax(model(x), dim=1)
    got = ref(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, unresized, atol=1e-3)  # the refinery really saw another size
    seen = ref.resize(x)
    assert seen.shape[-2:] == (resolution, resolution) and seen.is_contiguous(memory_format=torch.channels_last)
    if resolution < 32:  # shrinking is antialiased (a plain bilinear shrink skips pixels)
        plain = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        assert not torch.allclose(seen, plain, atol=1e-3)
    # bf16 crops (what the loaders hand over under autocast): resized in fp32, handed on in bf16
    xb = x.to(torch.bfloat16)
    assert ref.resize(xb).dtype == torch.bfloat16
    assert torch.equal(ref.resize(xb), F.interpolate(xb.float(), size=(resolution, resolution), mode="bilinear",
                                                     align_corners=False, antialias=True).to(torch.bfloat16))


def test_refinery_without_resolution_or_at_the_crop_size_sees_the_crop_itself(demo_tree):
    x = _real_crops(demo_tree)
    for resolution in (None, 32):
        ref = Refinery(create_model("tiny_cnn", num_classes=10), resolution=resolution)
        assert ref.resize(x) is x
