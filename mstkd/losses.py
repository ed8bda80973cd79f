"""The losses of MST-KDNet, one small module each, and the weighted total.

Notation: T = teacher, S = student; ``l`` are class logits ``B x 4 x H x W x D`` over the
mutually exclusive classes (NETC, ED, ET, BG), ``p = sigmoid(l)`` (one sigmoid per class, as
the official code), ``g`` the one-hot class targets (:func:`class_targets`); ``sg`` is
stop-gradient. Every term can be switched off for ablations (``loss.mstkd``, ``loss.dmld``,
``loss.gsm``) and every weight lives in ``configs/loss.yaml``; ``docs/method.md`` lists the
measured scale of each. Where the official code has a defect, the corrected form is the
default and the official one sits behind a flag (see the config).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from mstkd.data.labels import classes_from_regions
from mstkd.schema import CHOICES

OFFICIAL_GRAM_SCALE = 1e-4 / (4 * 128**2 * 480**2)
"""The official code's normalisation of the cross-layer Gram loss, ``1e-4 / (4 C^2 N^2)`` with its
hard-coded ``C = 128`` channels and ``N = 480`` (= D x H of its 20 x 24 x 16 bottleneck): about 6.6e-15."""


def class_targets(regions: torch.Tensor) -> torch.Tensor:
    """``B x 3 x ...`` ET, TC, WT region targets (0/1) -> ``B x 4 x ...`` one-hot NETC, ED, ET, BG (float).

    Padding and augmentation act on the regions (padding is 0 = outside every region), so the
    conversion happens here, on the batch the loss sees.
    """
    return classes_from_regions(regions.transpose(0, 1)).transpose(0, 1).to(regions.dtype)


def probabilities(logits: torch.Tensor, activation: str = "sigmoid") -> torch.Tensor:
    """Class probabilities from ``B x 4 x ...`` logits: one sigmoid per class (the official code) or a softmax
    over the classes."""
    if activation == "sigmoid":
        return torch.sigmoid(logits.float())
    if activation == "softmax":
        return torch.softmax(logits.float(), dim=1)
    raise ValueError(f"loss.activation must be one of {', '.join(CHOICES['loss.activation'])}, got {activation!r}")


class SegmentationLoss(nn.Module):
    """Soft Dice over the four classes, plus an optional cross-entropy.

    ``L = sum_c [1 - 2 sum(p_c g_c) / (sum p_c^2 + sum g_c^2 + eps)] + w_ce * CE(l, g)``, sums over
    batch and voxels of each class c (squared denominators, as the official code), ``p`` from
    :func:`probabilities`; CE is the binary cross-entropy per class for sigmoid outputs, the
    categorical one for softmax outputs (nnU-Net's Dice + CE).
    """

    def __init__(self, ce_weight: float = 0.0, activation: str = "sigmoid", eps: float = 1e-5) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.activation = activation
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = probabilities(logits, self.activation)
        g = target.float()
        dims = (0, *range(2, p.ndim))
        dice = 2 * (p * g).sum(dims) / ((p * p).sum(dims) + (g * g).sum(dims) + self.eps)
        loss = (1 - dice).sum()
        if self.ce_weight and self.activation == "sigmoid":
            loss = loss + self.ce_weight * F.binary_cross_entropy_with_logits(logits.float(), g)
        elif self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), g.argmax(1))
        return loss


def consistency_ramp(epoch: float, ramp_epochs: float = 20.0, top: float = 10.0) -> float:
    """Weight of the probability consistency: ``top * exp(-5 (1 - min(e, R)/R)^2)`` (0.067 at e=0, 10 from e=R).

    The official code ramps over R = 20 of its 100 epochs; :class:`MSTKDLoss` sets R to the same
    fraction of the run's planned epochs (``loss.consistency_ramp``).
    """
    if ramp_epochs <= 0:
        return top
    t = 1.0 - min(max(epoch, 0.0), ramp_epochs) / ramp_epochs
    return top * math.exp(-5.0 * t * t)


class ConsistencyLoss(nn.Module):
    """DMLD mode 1: ``MSE(p^T, p^S)`` over all four class channels and voxels (background included: the
    official code put the teacher's background Dice here instead)."""

    def __init__(self, activation: str = "sigmoid") -> None:
        super().__init__()
        self.activation = activation

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(
            probabilities(student_logits, self.activation), probabilities(teacher_logits, self.activation)
        )


def standardize(logits: torch.Tensor, dim: int, floor: float = 0.0) -> torch.Tensor:
    """Z-score logits along ``dim``: ``(l - mean) / (max(std, floor) + 1e-7)`` (logit standardisation, Sun et al.
    2024). The floor keeps a near-constant logit vector (an untrained network's) from being blown up to unit
    spread, which would make a few voxels' noise dominate the loss."""
    centred = logits - logits.mean(dim, keepdim=True)
    # the sample std (as Tensor.std) written out: torch's std along a 4-long class axis of a 64^3 crop takes
    # about 22 ms on two CPU cores, this about 3 ms, equal to float32 rounding; the clamp keeps the gradient of
    # a constant logit vector finite (zero, as Tensor.std's), where sqrt's alone would be 0 * inf
    var = centred.square().sum(dim, keepdim=True) / (logits.shape[dim] - 1)
    std = var.clamp_min(1e-30).sqrt()
    if floor > 0:
        std = std.clamp_min(floor)
    return centred / (std + 1e-7)


class StandardizedKLLoss(nn.Module):
    """DMLD mode 2: temperature-scaled KL between softmaxes of standardised logits.

    Corrected form (default): ``q^n = softmax_c(Z_c(l^n) / tau)`` with Z over the four exclusive
    classes (std floored at ``std_floor``), ``L = tau^2 * mean_{b, voxels} KL(sg(q^T) || q^S)``.
    Official form (``official=True``): Z over the last spatial axis, ``KL(q^S || q^T)``, no
    stop-gradient, normalised by ``B * numel(l)``.
    """

    def __init__(self, temperature: float = 7.0, official: bool = False, std_floor: float = 0.0) -> None:
        super().__init__()
        self.tau = temperature
        self.official = official
        self.floor = std_floor

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        t, s = teacher_logits.float(), student_logits.float()
        if self.official:
            log_qt = F.log_softmax(standardize(t, -1) / self.tau, dim=1)
            log_qs = F.log_softmax(standardize(s, -1) / self.tau, dim=1)
            kl = (log_qs.exp() * (log_qs - log_qt)).sum()
            return self.tau**2 * kl / t.shape[0] / t.numel()
        log_qt = F.log_softmax(standardize(t.detach(), 1, self.floor) / self.tau, dim=1)
        log_qs = F.log_softmax(standardize(s, 1, self.floor) / self.tau, dim=1)
        kl = (log_qt.exp() * (log_qt - log_qs)).sum(1)
        return self.tau**2 * kl.mean()


class AttentionDistillationLoss(nn.Module):
    """MS-TKD (a), extreme-value distillation on the tapped attention maps ``A_k`` (``B x h x N x N``).

    Per network, ``M_max, M_min, M_mean`` = element-wise max, min, mean of ``A_k`` over the taps k;
    ``L = sum_k sum_op MSE(s A^T_k * s M^T_op, s A^S_k * s M^S_op)`` with the maps scaled by ``s``:
    ``norm="raw"``: s = 1 (the official code, with weight 1e8); ``norm="tokens"``: s = N, so that
    uniform attention is 1 whatever the token count N.
    """

    def __init__(self, norm: str = "tokens") -> None:
        super().__init__()
        if norm not in ("raw", "tokens"):
            raise ValueError(f"loss.attention_norm must be raw or tokens, got {norm!r}")
        self.norm = norm

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        scale = teacher[0].shape[-1] if self.norm == "tokens" else 1.0
        at = torch.stack([a.float() for a in teacher]) * scale
        as_ = torch.stack([a.float() for a in student]) * scale
        loss = at.new_zeros(())
        for op in (lambda a: a.amax(0), lambda a: a.amin(0), lambda a: a.mean(0)):
            mt, ms = op(at), op(as_)
            loss = loss + sum(F.mse_loss(as_[k] * ms, at[k] * mt) for k in range(len(teacher)))
        return loss


class FeatureDistillationLoss(nn.Module):
    """MS-TKD (b): ``sum_j MSE(F^S_j, F^T_j)`` over the multi-scale transformer features z3', z6', z9', z12'."""

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        return sum(F.mse_loss(s.float(), t.float()) for t, s in zip(teacher, student, strict=True))


def cross_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``B x C x ...`` twice -> ``B x C x C`` Gram matrix ``X Y^T / (C n)`` with ``n`` voxels."""
    b, c = x.shape[:2]
    xf, yf = x.float().reshape(b, c, -1), y.float().reshape(b, c, -1)
    return xf @ yf.transpose(1, 2) / (c * xf.shape[-1])


class GlobalStyleLoss(nn.Module):
    """GSM cross-layer Gram matching over the global style features ``[f_enc, f_t, f_dec]``.

    ``G^n_i = cross_gram(F^n_i, F^n_{i-1})`` for i = 0, 1, 2 (index -1 wraps to 2: pairs
    (enc, dec), (t, enc), (dec, t)); ``L = scale * sum_i ||G^T_i - G^S_i||_F^2``, summed over the
    C x C entries and averaged over the batch, with the official ``scale`` (:data:`OFFICIAL_GRAM_SCALE`).
    """

    def __init__(self, scale: float = OFFICIAL_GRAM_SCALE) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        loss = teacher[0].new_zeros((), dtype=torch.float32)
        for i in range(len(teacher)):
            gt = cross_gram(teacher[i], teacher[i - 1])
            gs = cross_gram(student[i], student[i - 1])
            loss = loss + (gt - gs).pow(2).sum((1, 2)).mean()
        return self.scale * loss


def adversarial_loss(logits: torch.Tensor, label: float) -> torch.Tensor:
    """``BCEWithLogits(D(x), label)`` averaged over the batch; teacher = 0 ("full"), student = 1 ("missing")."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label))


TERMS = (
    "seg_teacher",
    "seg_student",
    "attention",
    "transformer_features",
    "consistency",
    "kl",
    "gram",
    "content",
    "adversarial",
)
"""Names of the weighted terms :class:`MSTKDLoss` can return, by mechanism."""


class MSTKDLoss(nn.Module):
    """The weighted sum of every active term for one teacher/student step (``cfg`` = the ``loss`` section).

    ``forward`` returns a dict of weighted terms (their sum is the generator loss):
    ``seg_teacher``, ``seg_student``; with ``mstkd``: ``attention``, ``transformer_features``;
    with ``dmld``: ``consistency``, ``kl``; with ``gsm``: ``gram``, ``adversarial`` (the latter only when a
    discriminator is given); and SMU-Net's ``content``. A term whose weight is 0 is not computed (the per-term
    ablations of the benchmark switch one term off that way).

    ``epochs`` is the run's planned length (``train.epochs``; rounds x local epochs in a federation):
    the consistency ramp spans ``loss.consistency_ramp`` of it, as the official 20 of 100 epochs.
    ``target`` is the one-hot class target ``B x 4 x ...`` (:func:`class_targets`).
    """

    def __init__(self, cfg, epochs: float = 100.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.ramp_epochs = float(cfg.consistency_ramp) * float(epochs)
        self.seg = SegmentationLoss(ce_weight=float(cfg.ce), activation=str(cfg.activation))
        self.consistency = ConsistencyLoss(str(cfg.activation))
        self.kl = StandardizedKLLoss(
            float(cfg.kl_temperature), official=bool(cfg.kl_official), std_floor=float(cfg.kl_std_floor)
        )
        self.attention = AttentionDistillationLoss(str(cfg.attention_norm))
        self.features = FeatureDistillationLoss()
        self.gram = GlobalStyleLoss()

    def forward(self, teacher, student, target: torch.Tensor, epoch: float, discriminator=None) -> dict:
        c = self.cfg
        t = _detached(teacher) if c.detach_teacher else teacher
        terms = {
            "seg_teacher": c.teacher_seg * self.seg(teacher.logits, target),
            "seg_student": c.student_seg * self.seg(student.logits, target),
        }
        if c.mstkd and c.attention:
            terms["attention"] = c.attention * self.attention(t.attention, student.attention)
        if c.mstkd and c.transformer_features:
            terms["transformer_features"] = c.transformer_features * self.features(
                t.transformer_features, student.transformer_features
            )
        weight = consistency_ramp(epoch, self.ramp_epochs, float(c.consistency_max))
        if c.dmld and weight:
            terms["consistency"] = weight * self.consistency(t.logits, student.logits)
        if c.dmld and c.kl:
            terms["kl"] = c.kl * self.kl(t.logits, student.logits)
        if c.gsm and c.gram:
            terms["gram"] = c.gram * self.gram(t.global_style, student.global_style)
        if c.content:  # SMU-Net's content term, not part of GSM: it has its own weight and arm
            terms["content"] = c.content * F.mse_loss(student.content.float(), t.content.float())
        if c.gsm and c.adversarial and discriminator is not None:
            terms["adversarial"] = c.adversarial * adversarial_loss(discriminator(student.style), 0.0)
        return terms


def _detached(out):
    """A copy of a network output with every tensor detached."""

    def d(v):
        return [x.detach() for x in v] if isinstance(v, list) else v.detach()

    return replace(out, **{f.name: d(getattr(out, f.name)) for f in fields(out)})


def discriminator_loss(discriminator: nn.Module, teacher_style: torch.Tensor, student_style: torch.Tensor):
    """``BCE(D(sg(style^T)), 0) + BCE(D(sg(style^S)), 1)``: the discriminator's own loss."""
    return adversarial_loss(discriminator(teacher_style.detach()), 0.0) + adversarial_loss(
        discriminator(student_style.detach()), 1.0
    )
