"""The local teacher-student loop: one function, used by centralised training and by every federated site.

Per step, on one batch of crops ``x`` (``B x 4 x h x w x d``) with region targets turned into
one-hot class targets ``y`` (``B x 4 x h x w x d``, NETC, ED, ET, BG):

1. draw the student's modality subset ``m`` (uniform over the 15, or per-site weights);
2. forward the teacher on ``x`` and the student on ``zero_fill(x, m)``;
3. generator step: the weighted terms of :class:`~mstkd.losses.MSTKDLoss` (segmentation of
   both, MS-TKD, DMLD, GSM including the adversarial term), one Adam step over teacher and
   student with gradient clipping at ``train.grad_clip``: of both as one vector
   (``train.grad_clip_scope=joint``, the reference) or of each on its own (``separate``: a student
   with huge gradients, e.g. from a hostile global model, does not shrink the teacher's step);
4. discriminator step (when GSM is on): ``BCE(D(style^T), 0) + BCE(D(style^S), 1)`` with its
   own Adam, whose state persists across steps (the official code re-created it each step).

A step whose loss or gradients are not finite is skipped (no optimiser moves, the moments are
untouched) and counted (``skipped_steps``): one bad crop or a global model that is barely holding
together costs that step, never the weights.

The learning rate follows the poly schedule ``lr (1 - e / E)^0.9`` of a global (virtual)
epoch ``e``, so the same schedule holds whether epochs run on one machine or as rounds.
With ``train.mode=student`` only the student trains, on its segmentation loss (the baseline).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from monai.utils import set_determinism
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mstkd.data.labels import CLASSES
from mstkd.errors import RefusedMessage
from mstkd.losses import MSTKDLoss, class_targets, discriminator_loss, probabilities
from mstkd.modalities import SUBSETS, Subset, sample_subset, zero_fill
from mstkd.model import MSTKDNet, StyleDiscriminator


@dataclass
class Networks:
    """The three trained modules of one site."""

    teacher: MSTKDNet
    student: MSTKDNet
    discriminator: StyleDiscriminator

    def to(self, device: torch.device | str) -> Networks:
        """Move to ``device``; on CPU also to the channels-last layout, which oneDNN runs faster."""
        device = torch.device(device)
        layout = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
        for m in (self.teacher, self.student, self.discriminator):
            m.to(device=device, memory_format=layout)
        return self


@dataclass
class Optimizers:
    """Adam over teacher + student, and the discriminator's own Adam."""

    main: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer


def make_optimizers(nets: Networks, cfg: DictConfig) -> Optimizers:
    """Fresh optimisers for ``nets`` (``cfg`` = the ``train`` section)."""
    main = torch.optim.Adam(
        [{"params": nets.teacher.parameters()}, {"params": nets.student.parameters()}],
        lr=float(cfg.lr),
        weight_decay=float(cfg.weight_decay),
    )
    disc = torch.optim.Adam(nets.discriminator.parameters(), lr=float(cfg.disc_lr), betas=tuple(cfg.disc_betas))
    return Optimizers(main, disc)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    """Forget ``optimizer``'s moments for ``module``'s parameters (the others keep theirs)."""
    for p in module.parameters():
        optimizer.state.pop(p, None)


def poly_lr(cfg: DictConfig, epoch: float) -> float:
    """``lr * (1 - epoch / epochs) ^ poly_power`` (0-based epoch; the last epoch keeps a small non-zero lr)."""
    frac = min(max(epoch, 0.0) / float(cfg.epochs), 1.0)
    return float(cfg.lr) * (1.0 - frac) ** float(cfg.poly_power)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI's random transforms."""
    set_determinism(seed=seed % 2**32)


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or ``preferred``), else CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled and supported; a no-op otherwise (CPU runs in float32)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def passes(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass, each pass drawn anew: its own order, random crops and augmentation
    (``itertools.cycle`` would replay the first pass, and hold all of its batches in memory). Ends when a pass
    yields nothing."""
    while True:
        drawn = False
        for batch in loader:
            drawn = True
            yield batch
        if not drawn:
            return


PACE_STEPS = 5
"""Steps left out of the pace as warm-up (the first steps load kernels), and then timed before it is judged."""
PACE_MARGIN = 1.25
"""The pace refuses work only when the steps left would need this many times the time left."""


def check_pace(deadline: float, done: int, steps: int, since: float | None, of: str = "the message's expiry") -> None:
    """Stop work whose result no one will receive: it is past ``deadline`` (``time.time()``), or, once
    2 x :data:`PACE_STEPS` of its ``steps`` are done, the steps left would need over :data:`PACE_MARGIN` times the
    time left at the mean pace since ``since`` (``time.perf_counter()`` when step :data:`PACE_STEPS` began). ``of``
    names the limit in the reason.

    Raises:
        RefusedMessage: why, in one line that names no data (a federated node sends it to the server).
    """
    now = time.time()
    if now > deadline:
        raise RefusedMessage(f"this round's work reached its deadline ({of}) after {done} of {steps} steps")
    if since is not None and done >= 2 * PACE_STEPS:
        pace = (time.perf_counter() - since) / (done - PACE_STEPS)
        if pace * (steps - done) > PACE_MARGIN * (deadline - now):
            raise RefusedMessage(
                f"this round's {steps} steps would end past its deadline ({of}): {steps - done} left at "
                f"{pace:.2f} s a step, {deadline - now:.0f} s left"
            )


def train_local(
    nets: Networks,
    optimizers: Optimizers,
    loader: Iterable,
    cfg: DictConfig,
    *,
    steps: int | None = None,
    epoch: float = 0.0,
    subsets: Sequence[Subset] = SUBSETS,
    subset_weights: Sequence[float] | None = None,
    rng: np.random.Generator | None = None,
    device: torch.device | None = None,
    proximal_mu: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    deadline: float | None = None,
    deadline_of: str = "the message's expiry",
) -> dict[str, float]:
    """Run ``steps`` teacher-student steps (default: one pass over ``loader``), updating ``nets`` in place.

    Args:
        nets: teacher, student and discriminator (moved to ``device``).
        optimizers: their optimisers, whose state carries over between calls.
        loader: yields dicts with ``image`` ``B x 4 x h x w x d`` and ``label`` ``B x 3 x h x w x d``; iterated
            once per pass, so it must be re-iterable (a DataLoader or a list, not a generator).
        cfg: the full config (``train`` and ``loss`` sections are read).
        steps: number of steps; the loader is iterated again when shorter (:func:`passes`).
        epoch: the global epoch at the start, for the lr schedule and the consistency ramp.
        subsets: the student's possible modality subsets (a site lacking a modality passes fewer).
        subset_weights: sampling weights over ``subsets`` (None: ``train.subset_weights`` when ``subsets``
            are all 15, else uniform).
        rng: generator for the subset draws (its state is the caller's to keep).
        device: where to train (default: CUDA if present, else CPU).
        proximal_mu: FedProx term ``mu / 2 * ||w - w_0||^2`` on the student, ``w_0`` = its weights at the start.
        progress: show a progress bar.
        deadline: ``time.time()`` by which the work must end (a federated message's, when its reply would be
            dropped): :func:`check_pace` stops it before any step that starts past it, or once the steps left
            clearly would, at the pace so far; ``deadline_of`` names it in the reason.

    Returns:
        Mean of each weighted loss term over the steps taken, ``loss`` (their sum), ``disc_loss``, ``steps``,
        ``skipped_steps`` (non-finite loss or gradients), ``lr``,
        ``seconds``, ``epoch`` (the global epoch at the end) and ``fg_<class>``: the share of crop
        voxels the student put in each class (probability > 0.5), the first sign of a collapse.
    """
    device = device or pick_device()
    rng = rng or np.random.default_rng(int(cfg.train.seed))
    if subset_weights is None and cfg.train.subset_weights is not None and len(subsets) == len(SUBSETS):
        subset_weights = list(cfg.train.subset_weights)  # the config's weights are over all 15, in paper order
    nets.to(device)
    for m in (nets.teacher, nets.student, nets.discriminator):
        m.train()
    criterion = MSTKDLoss(cfg.loss, epochs=float(cfg.train.epochs))
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    steps = steps if steps is not None else n_batches
    if not steps:
        raise ValueError("nothing to train: the loader is empty and no step count was given")
    epoch_len = float(n_batches or steps)
    student_only = str(cfg.train.mode) == "student"
    if str(cfg.train.mode) not in ("mstkd", "student"):
        raise ValueError(f"train.mode must be mstkd or student, got {cfg.train.mode!r}")
    gsm = bool(cfg.loss.gsm)
    amp = bool(cfg.train.amp)
    clip = float(cfg.train.grad_clip) if cfg.train.grad_clip else float("inf")
    groups = [list(nets.student.parameters())] + ([] if student_only else [list(nets.teacher.parameters())])
    parts = groups  # what is checked for non-finite gradients: each network on its own
    if str(cfg.train.grad_clip_scope) == "joint":
        groups = [[p for group in groups for p in group]]
    skipped = counted = 0
    anchor = [p.detach().clone() for p in nets.student.parameters()] if proximal_mu > 0 else None

    sums: defaultdict[str, float] = defaultdict(float)
    drawn: Counter[str] = Counter()
    start = time.perf_counter()
    bar = tqdm(islice(passes(loader), steps), total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    paced = None  # when the pace began to be timed
    for i, batch in enumerate(bar):
        if i == PACE_STEPS:
            paced = time.perf_counter()
        if deadline is not None:
            check_pace(deadline, i, steps, paced, deadline_of)
        e = epoch + i / epoch_len
        lr = poly_lr(cfg.train, e)
        for group in optimizers.main.param_groups:
            group["lr"] = lr
        x = batch["image"].to(device, non_blocking=True)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = class_targets(batch["label"].to(device, non_blocking=True))
        subset = sample_subset(rng, subsets, subset_weights)
        drawn[subset.name] += 1

        with autocast(device, amp):
            out_s = nets.student(zero_fill(x, subset))
            if student_only:
                terms = {"seg_student": criterion.seg(out_s.logits, y)}
            else:
                out_t = nets.teacher(x)
                terms = criterion(out_t, out_s, y, e, nets.discriminator if gsm else None)
        if anchor is not None:
            drift = sum((p - p0).pow(2).sum() for p, p0 in zip(nets.student.parameters(), anchor, strict=True))
            terms["proximal"] = 0.5 * proximal_mu * drift
        loss = sum(terms.values())
        optimizers.main.zero_grad(set_to_none=True)
        loss.backward()
        # checked per network, whatever the clipping: a NaN in one must not reach the other through a shared
        # clipping coefficient, nor through Adam's moments
        norms = [torch.nn.utils.get_total_norm([p.grad for p in part if p.grad is not None]) for part in parts]
        if not (torch.isfinite(loss.detach()) and all(torch.isfinite(n) for n in norms)):
            optimizers.main.zero_grad(set_to_none=True)
            skipped += 1
            continue
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, clip)  # clip = inf: measured, not clipped
        optimizers.main.step()

        if gsm and not student_only:
            optimizers.discriminator.zero_grad(set_to_none=True)  # drops what the generator term left there
            with autocast(device, amp):
                d_loss = discriminator_loss(nets.discriminator, out_t.style, out_s.style)
            d_loss.backward()
            d_norm = torch.nn.utils.clip_grad_norm_(list(nets.discriminator.parameters()), float("inf"))
            if torch.isfinite(d_loss.detach()) and torch.isfinite(d_norm):
                optimizers.discriminator.step()
                sums["disc_loss"] += float(d_loss.detach())
            optimizers.discriminator.zero_grad(set_to_none=True)

        counted += 1
        for name, value in terms.items():
            sums[name] += float(value.detach())
        with torch.no_grad():
            probs = probabilities(out_s.logits.detach(), str(cfg.loss.activation))
            shares = (probs > 0.5).float().mean(dim=(0, *range(2, probs.ndim)))
        for name, share in zip(CLASSES, shares.tolist(), strict=True):
            sums[f"fg_{name}"] += share
        sums["loss"] += float(loss.detach())
        if progress:
            bar.set_postfix(loss=f"{sums['loss'] / counted:.3f}", refresh=False)

    out = {name: total / max(counted, 1) for name, total in sums.items()}  # means over the steps taken
    if counted + skipped < steps:  # a loader that cannot be iterated again (a generator) ran dry
        taken = counted + skipped
        raise ValueError(f"the loader gave {taken} of the {steps} batches asked for; pass one that can be re-iterated")
    out.update(steps=float(steps), lr=lr, seconds=time.perf_counter() - start, epoch=epoch + steps / epoch_len)
    out["skipped_steps"] = float(skipped)
    out["subsets_drawn"] = float(len(drawn))
    return out
