"""The typed schema of the project config, and the checks every config passes before any work.

The YAML files under ``configs/`` give the values; the dataclasses below give each key its type,
so OmegaConf refuses ``train.lr=abc`` while merging. :func:`check_config` then refuses values of
the right type that cannot work (``train.epochs=0``, ``eval.overlap=1.5``, an unknown subset
name), each with one line that names the key. Both run in :func:`mstkd.config.load_config`,
before any data is read or any file written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig

from mstkd.data.geometry import MAX_VOXELS, check_orientation, check_spacing
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES, SUBSETS, parse_subsets
from mstkd.postprocess import MAX_ET_MIN_MM3

# ----------------------------------------------------------------------------- types


@dataclass
class Split:
    seed: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    min_site_cases_for_test: int = MISSING


@dataclass
class Augment:
    flip_prob: float = MISSING
    intensity_scale: float = MISSING
    intensity_shift: float = MISSING
    intensity_prob: float = MISSING


@dataclass
class Data:
    normalization: str = MISSING
    cache_dtype: str = MISSING
    modalities: list[str] = MISSING
    split: Split = field(default_factory=Split)
    patch_size: list[int] | None = MISSING
    foreground_ratio: float = MISSING
    target_spacing: list[float] | None = MISSING
    orientation: str = MISSING
    augment: Augment = field(default_factory=Augment)
    num_workers: int = MISSING


@dataclass
class Eval:
    roi: list[int] | None = MISSING
    overlap: float = MISSING
    blend: str = MISSING
    decode: str = MISSING
    threshold: float = MISSING
    sw_batch_size: int = MISSING
    collapse_share: float = MISSING
    collapse_ratio: float = MISSING
    et_min_mm3: float = MISSING
    lesion: str = MISSING


@dataclass
class Loss:
    teacher_seg: float = MISSING
    student_seg: float = MISSING
    activation: str = MISSING
    ce: float = MISSING
    mstkd: bool = MISSING
    attention: float = MISSING
    attention_norm: str = MISSING
    transformer_features: float = MISSING
    dmld: bool = MISSING
    consistency_max: float = MISSING
    consistency_ramp: float = MISSING
    kl: float = MISSING
    kl_temperature: float = MISSING
    kl_std_floor: float = MISSING
    kl_official: bool = MISSING
    gsm: bool = MISSING
    gram: float = MISSING
    adversarial: float = MISSING
    content: float = MISSING
    detach_teacher: bool = MISSING


@dataclass
class Metrics:
    hd95: str = MISSING
    empty_hd95: float | None = MISSING


@dataclass
class Train:
    seed: int = MISSING
    mode: str = MISSING
    epochs: float = MISSING  # a federation plans rounds x local epochs, which may be fractional
    steps_per_epoch: int | None = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    poly_power: float = MISSING
    disc_lr: float = MISSING
    disc_betas: list[float] = MISSING
    grad_clip: float | None = MISSING
    grad_clip_scope: str = MISSING
    amp: bool = MISSING
    student_moments: str = MISSING
    state_precision: str = MISSING
    subset_weights: list[float] | None = MISSING
    eval_every: int = MISSING
    eval_subsets: Any = MISSING  # "all", "full", or a list of subset names
    out_dir: str = MISSING


@dataclass
class ViT:
    hidden: int = MISSING
    layers: int = MISSING
    heads: int = MISSING
    mlp: int = MISSING
    patch: int = MISSING
    dropout: float = MISSING
    taps: int = MISSING


@dataclass
class Model:
    preset: str = MISSING
    base_channels: int = MISSING
    norm_groups: int = MISSING
    vit: ViT = field(default_factory=ViT)
    decoder_channels: list[int] = MISSING
    decoder_norm: str = MISSING
    fuse_dropout: float = MISSING
    discriminator_channels: list[int] = MISSING
    input_size: list[int] = MISSING
    attention_distillation: float = MISSING


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    eval: Eval = field(default_factory=Eval)
    loss: Loss = field(default_factory=Loss)
    metrics: Metrics = field(default_factory=Metrics)
    train: Train = field(default_factory=Train)
    model: Model = field(default_factory=Model)


# ----------------------------------------------------------------------------- values

CHOICES = {
    "data.normalization": ("zscore", "minmax"),
    "data.cache_dtype": ("float16", "float32"),
    "eval.blend": ("gaussian", "constant"),
    "eval.decode": ("auto", "argmax", "threshold"),
    "eval.lesion": ("", "brats2023", "panoptica"),
    "loss.activation": ("softmax", "sigmoid"),
    "loss.attention_norm": ("tokens", "raw"),
    "metrics.hd95": ("max", "pooled"),
    "train.mode": ("mstkd", "student"),
    "train.student_moments": ("reset", "keep"),
    "train.state_precision": ("full", "half"),
    "train.grad_clip_scope": ("joint", "separate"),
    "model.decoder_norm": ("instance", "batch"),
}

POSITIVE = (
    "train.epochs",
    "train.lr",
    "train.disc_lr",
    "train.batch_size",
    "train.eval_every",
    "train.steps_per_epoch",
    "train.grad_clip",
    "loss.kl_temperature",
    "eval.sw_batch_size",
    "eval.collapse_share",
    "eval.collapse_ratio",
    "model.base_channels",
    "model.norm_groups",
    "model.vit.hidden",
    "model.vit.layers",
    "model.vit.heads",
    "model.vit.mlp",
    "model.vit.taps",
)
"""Keys that must be > 0 (``null`` allowed where the type is optional)."""

NON_NEGATIVE = (
    "train.weight_decay",
    "train.poly_power",
    "data.num_workers",
    "data.split.min_site_cases_for_test",
    "data.augment.intensity_scale",
    "data.augment.intensity_shift",
    "metrics.empty_hd95",
    *(
        f"loss.{k}"
        for k in (
            "teacher_seg",
            "student_seg",
            "ce",
            "attention",
            "transformer_features",
            "consistency_max",
            "kl",
            "kl_std_floor",
            "gram",
            "adversarial",
            "content",
        )
    ),
)

UNIT = (
    "data.foreground_ratio",
    "data.augment.flip_prob",
    "data.augment.intensity_prob",
    "data.split.val_fraction",
    "data.split.test_fraction",
    "eval.threshold",
    "eval.collapse_share",
    "loss.consistency_ramp",
    "model.vit.dropout",
    "model.fuse_dropout",
)
"""Keys in [0, 1]."""


MAX_VIT_LAYERS = 64
MAX_STAGES = 16
"""Bounds on how many modules a model config makes (the paper's network has 12 ViT layers and 4 decoder stages)."""

MAX_SIDE = 512
"""The most voxels along each side of a training crop or a sliding window (the paper's crop: 160 x 192 x 128). A
window is allocated whole, however small the case (MONAI pads the case to it); 512^3 is 134 M voxels, under the
most a resampled case may have (:data:`mstkd.data.geometry.MAX_VOXELS`), which also bounds a batch of crops or
windows (``train.batch_size``, ``eval.sw_batch_size``)."""

AT_MOST = {
    "model.base_channels": 64,  # the paper: 16 (its widest stage, 1/8 resolution, has 8 times that)
    "model.vit.hidden": 4096,  # 768
    "model.vit.mlp": 16384,  # 2048
    "model.vit.heads": 64,  # 12; each head keeps a tokens x tokens attention map
    "model.vit.layers": MAX_VIT_LAYERS,  # 12
    "data.num_workers": 64,  # 0; each one a process
}
"""Upper bounds of the numbers that size an allocation or a process count. A checkpoint's weights must fit its
config, but a few channels more cost little on disk and much in every activation, so the bounds are generous to
what the presets use and far below what would not fit a machine."""

MAX_OVERLAP = 0.9
"""The most a sliding window may overlap its neighbours (nnU-Net's and the default: 0.5). MONAI steps by the
window's side times (1 - overlap), at least one voxel, so windows grow as 1 / (1 - overlap)^3: at 0.9, 1000 times
a tiling without overlap; a checkpoint's 0.999 asked for a window at every voxel, days of inference per case."""

MAX_CHANNELS = 1024
"""The most channels of a decoder or discriminator stage (the paper's widest: 512)."""


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _bad(key: str, value: Any, why: str) -> InputError:
    return InputError(f"bad config value {key}={value!r}: {why}")


def check_config(cfg: DictConfig) -> None:
    """Refuse values that have the right type but cannot work, one line naming the key.

    Raises:
        InputError: the first bad value found.
    """
    _check_finite(cfg)
    for key, allowed in CHOICES.items():
        if (value := _get(cfg, key)) not in allowed:
            raise _bad(key, value, f"choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if (value := _get(cfg, key)) is not None and not value > 0:
            raise _bad(key, value, "must be greater than 0")
    for key in NON_NEGATIVE:
        if (value := _get(cfg, key)) is not None and value < 0:
            raise _bad(key, value, "must not be negative")
    for key in UNIT:
        if not 0 <= (value := _get(cfg, key)) <= 1:
            raise _bad(key, value, "must lie between 0 and 1")
    if not 0 <= cfg.eval.overlap <= MAX_OVERLAP:
        raise _bad("eval.overlap", cfg.eval.overlap, f"must lie between 0 and {MAX_OVERLAP}")
    if not 0 <= cfg.eval.et_min_mm3 <= MAX_ET_MIN_MM3:
        raise _bad("eval.et_min_mm3", cfg.eval.et_min_mm3, f"must lie between 0 and {MAX_ET_MIN_MM3:g} (mm³)")
    split = cfg.data.split
    if split.val_fraction + split.test_fraction >= 1:
        raise _bad("data.split.test_fraction", split.test_fraction, "val_fraction + test_fraction must be below 1")
    for key in ("model.input_size", "data.patch_size", "eval.roi"):
        size = _get(cfg, key)
        if size is not None and (len(size) != 3 or any(s <= 0 for s in size)):
            raise _bad(key, list(size), "give three positive sizes")
        if size is not None and any(s % 32 for s in size):
            raise _bad(key, list(size), "each size must be a multiple of 32 (the network downsamples 32-fold)")
        if size is not None and any(s > MAX_SIDE for s in size):
            raise _bad(key, list(size), f"each size must be at most {MAX_SIDE}")
    for key, bound in AT_MOST.items():
        if (value := _get(cfg, key)) > bound:
            raise _bad(key, value, f"at most {bound}")
    crop = math.prod(cfg.data.patch_size or cfg.model.input_size)
    window = math.prod(cfg.eval.roi or cfg.model.input_size)
    for key, each, what in (("train.batch_size", crop, "crops"), ("eval.sw_batch_size", window, "windows")):
        if (many := _get(cfg, key)) * each > MAX_VOXELS:
            raise _bad(key, many, f"at most {MAX_VOXELS // each} {what} of {each} voxels ({MAX_VOXELS:.3g} in all)")
    model = cfg.model
    if model.vit.patch != 4:
        raise _bad("model.vit.patch", model.vit.patch, "the decoder is built for ViT patches of 4")
    if model.vit.hidden % model.vit.heads:
        raise _bad("model.vit.heads", model.vit.heads, f"must divide model.vit.hidden ({model.vit.hidden})")
    if model.base_channels % model.norm_groups:
        raise _bad("model.norm_groups", model.norm_groups, f"must divide model.base_channels ({model.base_channels})")
    for key in ("model.decoder_channels", "model.discriminator_channels"):
        if not (channels := list(_get(cfg, key))) or any(c <= 0 for c in channels):
            raise _bad(key, channels, "give positive channel counts")
        if len(channels) > MAX_STAGES:
            raise _bad(key, channels, f"at most {MAX_STAGES} stages")
        if any(c > MAX_CHANNELS for c in channels):
            raise _bad(key, channels, f"at most {MAX_CHANNELS} channels a stage")
    if len(model.decoder_channels) != 4:
        raise _bad("model.decoder_channels", list(model.decoder_channels), "give four widths (one per tapped layer)")
    if model.vit.taps != 4:
        raise _bad("model.vit.taps", model.vit.taps, "the decoder reads 4 tapped layers")
    if model.vit.layers % model.vit.taps:
        raise _bad("model.vit.layers", model.vit.layers, "must be a multiple of model.vit.taps (4)")
    # the style discriminator halves the 1/8 feature map once per layer with 4-voxel kernels, so every side
    # of a training crop needs at least 2 voxels before its last layer: 8 x 2^layers
    smallest = 8 * 2 ** len(model.discriminator_channels)
    key = "data.patch_size" if cfg.data.patch_size is not None else "model.input_size"
    crop = list(_get(cfg, key))
    if any(s < smallest for s in crop):
        raise _bad(key, crop, f"each side of the training crop must be at least {smallest} for this model")
    if (spacing := cfg.data.target_spacing) is not None:
        try:
            check_spacing(spacing, "data.target_spacing")
        except InputError as exc:
            raise _bad("data.target_spacing", list(spacing), str(exc).split(": ", 1)[1]) from None
    try:
        check_orientation(cfg.data.orientation)
    except InputError:
        raise _bad("data.orientation", cfg.data.orientation, "give three axis codes such as LPS or RAS") from None
    if not cfg.data.modalities:
        raise _bad("data.modalities", [], "name at least one modality")
    if unknown := [m for m in cfg.data.modalities if m not in MODALITIES]:
        raise _bad("data.modalities", list(cfg.data.modalities), f"unknown {unknown}; known: {', '.join(MODALITIES)}")
    if len(cfg.train.disc_betas) != 2 or not all(0 <= b < 1 for b in cfg.train.disc_betas):
        raise _bad("train.disc_betas", list(cfg.train.disc_betas), "give two numbers in [0, 1)")
    weights = cfg.train.subset_weights
    if weights is not None and (len(weights) != len(SUBSETS) or any(w < 0 for w in weights) or not sum(weights) > 0):
        raise _bad(
            "train.subset_weights",
            list(weights),
            f"give {len(SUBSETS)} non-negative weights, in paper order, not all 0",
        )
    spec = cfg.train.eval_subsets if isinstance(cfg.train.eval_subsets, str) else list(cfg.train.eval_subsets)
    try:
        chosen = parse_subsets(spec)
    except (InputError, ValueError, KeyError) as exc:
        raise _bad("train.eval_subsets", spec, str(exc)) from None
    if not chosen:
        raise _bad("train.eval_subsets", spec, "name at least one subset (or all, or full)")


def _check_finite(cfg: DictConfig, prefix: str = "") -> None:
    """No NaN or infinity anywhere: a range check would let NaN through."""
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _bad(f"{prefix}{key}", value, "must be a finite number")
