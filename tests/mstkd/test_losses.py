"""Losses: known values on tiny tensors, switches, gradient flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mstkd.config import load_config
from mstkd.data.labels import classes_from_regions
from mstkd.losses import (
    OFFICIAL_GRAM_SCALE,
    TERMS,
    AttentionDistillationLoss,
    ConsistencyLoss,
    FeatureDistillationLoss,
    GlobalStyleLoss,
    MSTKDLoss,
    SegmentationLoss,
    StandardizedKLLoss,
    class_targets,
    consistency_ramp,
    cross_gram,
    discriminator_loss,
    standardize,
)
from mstkd.model import build_networks


def test_segmentation_dice_known_values():
    target = torch.zeros(1, 4, 2, 2, 2)
    target[:, :, 0] = 1
    big = 40.0
    perfect = (target * 2 - 1) * big  # sigmoid -> exactly the target (to float precision)
    assert SegmentationLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    # sigmoid(0) = 0.5 everywhere: per channel 1 - 2*0.5*4 / (0.25*8 + 4) = 1 - 4/6
    assert SegmentationLoss()(torch.zeros(1, 4, 2, 2, 2), target).item() == pytest.approx(4 * (1 - 4 / 6), rel=1e-5)
    with_bce = SegmentationLoss(ce_weight=1.0)(torch.zeros(1, 4, 2, 2, 2), target).item()
    assert with_bce == pytest.approx(4 * (1 - 4 / 6) + math.log(2), rel=1e-5)


def test_softmax_segmentation_known_values():
    """Softmax over the four classes: equal logits give p = 1/4 everywhere; CE is then log 4."""
    target = torch.zeros(1, 4, 2, 2, 2)
    target[:, 3] = 1  # all background
    target[:, 3, 0, 0, 0], target[:, 2, 0, 0, 0] = 0, 1  # one ET voxel
    loss = SegmentationLoss(activation="softmax")
    flat = torch.zeros(1, 4, 2, 2, 2)
    # per class 1 - 2 sum(p g) / (sum p^2 + sum g^2): NETC, ED: 1; ET: 1 - 0.5/(0.5 + 1); BG: 1 - 3.5/(0.5 + 7)
    expected = 2 + (1 - 0.5 / 1.5) + (1 - 3.5 / 7.5)
    assert loss(flat, target).item() == pytest.approx(expected, rel=1e-5)
    with_ce = SegmentationLoss(ce_weight=1.0, activation="softmax")(flat, target).item()
    assert with_ce == pytest.approx(expected + math.log(4), rel=1e-5)
    # a perfect answer: ET and BG cost nothing; NETC and ED are absent from the batch, so their Dice is
    # 0 / eps whatever is predicted: a constant 1 each, with no gradient
    assert loss((target * 2 - 1) * 30, target).item() == pytest.approx(2.0, abs=1e-4)


def test_everything_is_tumour_is_costly_with_the_background_class():
    """The trap of the region head: predicting WT everywhere. With a background class it costs a whole Dice."""
    regions = torch.zeros(1, 3, 8, 8, 8)
    regions[:, 2, 1:6, 1:6, 1:6] = 1  # edema shell
    regions[:, 1, 2:5, 2:5, 2:5] = 1  # tumour core ...
    regions[:, 0, 2:5, 2:5, 2:5] = 1  # ... enhancing
    regions[:, 0, 3, 3, 3] = 0  # ... around a necrotic voxel
    target = class_targets(regions)
    assert target.sum(1).eq(1).all()  # one class per voxel
    big = 20.0
    everything_tumour = torch.full((1, 4, 8, 8, 8), -big)
    everything_tumour[:, 2] = big  # ET predicted everywhere, background nowhere
    right = (target * 2 - 1) * big
    loss = SegmentationLoss()
    assert loss(right, target).item() < 1e-3
    assert loss(everything_tumour, target).item() > 2.9  # NETC, ED and BG near 1, ET far from 1


def test_class_targets_match_the_numpy_mapping():
    regions = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    classes = class_targets(regions)
    for b in range(2):
        expected = classes_from_regions(regions[b].numpy() > 0)
        assert np.array_equal(classes[b].numpy() > 0, expected)


def test_kl_tells_all_background_from_all_tumour():
    """Over the four exclusive classes the KL sees the difference the nested region head could not."""
    background = torch.tensor([-9.0, -8.5, -8.0, 9.0]).view(1, 4, 1, 1, 1).expand(1, 4, 2, 2, 2)
    tumour = torch.tensor([9.0, -8.5, -8.0, -9.0]).view(1, 4, 1, 1, 1).expand(1, 4, 2, 2, 2)
    kl = StandardizedKLLoss(temperature=1.0, std_floor=1.0)
    assert kl(background, background).item() == pytest.approx(0.0, abs=1e-6)
    assert kl(background, tumour).item() > 1.0
    assert kl(tumour, background).item() > 1.0


def test_kl_std_floor_keeps_near_constant_logits_quiet():
    """An untrained network's logits barely differ between classes: without a floor, z-scoring blows that
    noise up to unit spread; with it, the loss stays near zero."""
    torch.manual_seed(0)
    t = 0.01 * torch.randn(1, 4, 4, 4, 4)
    s = 0.01 * torch.randn(1, 4, 4, 4, 4)
    unfloored = StandardizedKLLoss(temperature=1.0)(t, s).item()
    floored = StandardizedKLLoss(temperature=1.0, std_floor=1.0)(t, s).item()
    assert floored < 1e-3 < unfloored
    # above the floor, the z-score is unchanged
    wide_t, wide_s = 5 * torch.randn(1, 4, 2, 2, 2), 5 * torch.randn(1, 4, 2, 2, 2)
    assert StandardizedKLLoss(1.0, std_floor=1.0)(wide_t, wide_s).item() == pytest.approx(
        StandardizedKLLoss(1.0)(wide_t, wide_s).item(), rel=1e-5
    )


def test_consistency_ramp_values():
    assert consistency_ramp(0) == pytest.approx(10 * math.exp(-5))  # 0.067
    assert consistency_ramp(10) == pytest.approx(10 * math.exp(-1.25))  # 2.87
    assert consistency_ramp(20) == consistency_ramp(50) == 10.0
    # the ramp spans the same fraction of every run: 20 of 100 epochs officially, 2 of 10 in a short run
    cfg = load_config(["model=tiny"]).loss
    assert MSTKDLoss(cfg, epochs=100).ramp_epochs == pytest.approx(20)
    assert MSTKDLoss(cfg, epochs=10).ramp_epochs == pytest.approx(2)


def test_consistency_is_probability_mse():
    t, s = torch.zeros(1, 4, 2, 2, 2), torch.full((1, 4, 2, 2, 2), math.log(3))  # sigmoid = 0.5 vs 0.75
    assert ConsistencyLoss()(t, s).item() == pytest.approx(0.0625)
    s = torch.zeros(1, 4, 2, 2, 2)
    s[:, 0] = math.log(3)  # softmax: (3, 1, 1, 1) / 6 against 1/4 each
    expected = ((0.5 - 0.25) ** 2 + 3 * (1 / 6 - 0.25) ** 2) / 4
    assert ConsistencyLoss("softmax")(t, s).item() == pytest.approx(expected, rel=1e-5)


def test_standardized_kl_known_value_direction_and_detach():
    t = torch.tensor([2.0, 0.0, -2.0]).view(1, 3, 1, 1, 1).requires_grad_()
    s = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1, 1).requires_grad_()
    loss = StandardizedKLLoss(temperature=1.0)(t, s)
    qt = F.softmax(standardize(t.detach(), 1).flatten(), 0)
    qs = F.softmax(standardize(s.detach(), 1).flatten(), 0)
    assert loss.item() == pytest.approx(float((qt * (qt / qs).log()).sum()), rel=1e-5)  # KL(qT || qS)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    # standardisation over classes makes the loss invariant to logit scale and shift
    assert StandardizedKLLoss(1.0)(t, s * 5 + 3).item() == pytest.approx(loss.item(), rel=1e-4)
    # the official form (z-score over the last spatial axis) flows into the teacher too
    t2 = torch.randn(1, 3, 1, 1, 4, requires_grad=True)
    StandardizedKLLoss(1.0, official=True)(t2, torch.randn(1, 3, 1, 1, 4)).backward()
    assert t2.grad is not None and t2.grad.abs().sum() > 0


def test_standardize_matches_the_sample_std_with_finite_gradients_on_constant_logits():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 3, 3, requires_grad=True)
    reference = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)
    assert torch.allclose(standardize(x, 1), reference, atol=1e-6)
    (grad,) = torch.autograd.grad(standardize(x, 1).pow(3).sum(), x)
    (expected,) = torch.autograd.grad(reference.pow(3).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-4)
    # an untrained network's constant logits: no NaN in the gradient, with or without the floor
    for floor in (0.0, 0.5):
        flat = torch.zeros(1, 4, 2, 2, 2, requires_grad=True)
        (grad,) = torch.autograd.grad(standardize(flat, 1, floor).pow(2).sum(), flat)
        assert torch.isfinite(grad).all()


def test_attention_distillation_zero_when_equal_and_scaled_by_tokens():
    a = [torch.softmax(torch.randn(1, 2, 5, 5), -1) for _ in range(4)]
    assert AttentionDistillationLoss()(a, a).item() == 0
    b = [x.roll(1, -1) for x in a]
    value = AttentionDistillationLoss()(a, b).item()
    assert value > 0
    # by hand for a single tap: max = min = mean = A, so 3 * MSE((5A)^2, (5B)^2)
    a1, b1 = a[:1], b[:1]
    expect = 3 * F.mse_loss((5 * b1[0]) ** 2, (5 * a1[0]) ** 2).item()
    assert AttentionDistillationLoss()(a1, b1).item() == pytest.approx(expect, rel=1e-5)
    # the official raw maps are the same loss divided by N^4
    assert AttentionDistillationLoss("raw")(a1, b1).item() == pytest.approx(expect / 5**4, rel=1e-5)


def test_feature_and_gram_losses():
    f = [torch.randn(1, 4, 2, 2, 2) for _ in range(4)]
    assert FeatureDistillationLoss()(f, f).item() == 0
    g = [x + 1 for x in f]
    assert FeatureDistillationLoss()(f, g).item() == pytest.approx(4.0)
    x = torch.ones(1, 2, 2, 2, 2)
    assert torch.allclose(cross_gram(x, x), torch.full((1, 2, 2), 0.5))  # 8 / (2 * 8)
    styles = [torch.randn(2, 4, 2, 2, 2) for _ in range(3)]
    assert GlobalStyleLoss()(styles, styles).item() == 0
    unscaled = GlobalStyleLoss(scale=1.0)(styles, [s * 2 for s in styles]).item()
    assert unscaled > 0
    # the official coefficient 1e-4 / (4 C^2 N^2) with C = 128, N = 480
    assert OFFICIAL_GRAM_SCALE == pytest.approx(1e-4 / (4 * 128**2 * 480**2))
    assert GlobalStyleLoss()(styles, [s * 2 for s in styles]).item() == pytest.approx(
        OFFICIAL_GRAM_SCALE * unscaled, rel=1e-5
    )


@pytest.fixture(scope="module")
def outputs():
    cfg = load_config(["model=tiny"])
    torch.manual_seed(0)
    teacher, student, disc = build_networks(cfg.model)
    x = torch.randn(1, 4, 32, 32, 32)
    target = class_targets((torch.rand(1, 3, 32, 32, 32) > 0.7).float())
    return cfg, teacher, student, disc, x, target


def test_switching_a_mechanism_off_removes_its_terms(outputs):
    cfg, teacher, student, disc, x, target = outputs
    with torch.no_grad():
        t, s = teacher(x), student(x)
    full = MSTKDLoss(cfg.loss)(t, s, target, epoch=5, discriminator=disc)
    assert set(full) == set(TERMS)
    for switch, removed in (
        ("mstkd", {"attention", "transformer_features"}),
        ("dmld", {"consistency", "kl"}),
        ("gsm", {"gram", "adversarial"}),  # content is SMU-Net's term, not GSM's: it stays
    ):
        c = load_config(["model=tiny", f"loss.{switch}=false"])
        terms = MSTKDLoss(c.loss)(t, s, target, epoch=5, discriminator=disc)
        assert set(terms) == set(full) - removed
        for name in terms:
            assert terms[name].item() == pytest.approx(full[name].item())


@pytest.mark.parametrize(
    ("weight", "term"),
    [
        ("attention", "attention"),
        ("transformer_features", "transformer_features"),
        ("consistency_max", "consistency"),
        ("kl", "kl"),
        ("gram", "gram"),
        ("adversarial", "adversarial"),
        ("content", "content"),
    ],
)
def test_a_term_of_weight_zero_is_not_computed_and_the_others_are_unchanged(outputs, weight, term):
    cfg, teacher, student, disc, x, target = outputs
    with torch.no_grad():
        t, s = teacher(x), student(x)
    full = MSTKDLoss(cfg.loss)(t, s, target, epoch=5, discriminator=disc)
    c = load_config(["model=tiny", f"loss.{weight}=0"])
    terms = MSTKDLoss(c.loss)(t, s, target, epoch=5, discriminator=disc)
    assert set(terms) == set(full) - {term}
    assert all(terms[name].item() == full[name].item() for name in terms)


def test_gradients_reach_the_student_from_every_distillation_term(outputs):
    cfg, teacher, student, disc, x, target = outputs
    t, s = teacher(x), student(x * 0.5)
    terms = MSTKDLoss(cfg.loss)(t, s, target, epoch=25, discriminator=disc)
    for name in ("transformer_features", "consistency", "kl", "gram", "content", "adversarial"):
        student.zero_grad()
        terms[name].backward(retain_graph=True)
        grad = sum(p.grad.abs().sum().item() for p in student.parameters() if p.grad is not None)
        assert grad > 0, name
    # with detach_teacher, no distillation term reaches the teacher
    c = load_config(["model=tiny", "loss.detach_teacher=true"])
    t, s = teacher(x), student(x * 0.5)
    terms = MSTKDLoss(c.loss)(t, s, target, epoch=25)
    teacher.zero_grad()
    sum(v for k, v in terms.items() if k != "seg_teacher").backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in teacher.parameters())


def test_discriminator_loss_trains_only_the_discriminator(outputs):
    cfg, teacher, student, disc, x, target = outputs
    t, s = teacher(x), student(x)
    loss = discriminator_loss(disc, t.style, s.style)
    assert loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(disc(t.style), torch.zeros(1)).item()
        + F.binary_cross_entropy_with_logits(disc(s.style), torch.ones(1)).item(),
        rel=1e-5,
    )
    student.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in student.parameters())
