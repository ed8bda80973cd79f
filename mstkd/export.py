"""A checkpoint as a MONAI bundle: the student as TorchScript, with its pre- and post-processing as MONAI configs.

``mstkd export CHECKPOINT OUT --format monai-bundle`` writes::

    OUT/configs/metadata.json    inputs, outputs, modalities and their files, class order, label convention,
                                 the training geometry, the checkpoint's sha256, the versions it was made with
    OUT/configs/inference.json   MONAI transforms and a sliding-window inferer: what ``mstkd predict`` does
    OUT/models/model.ts          the student's segmentation forward, traced at the sliding-window size
    OUT/docs/README.md           how to run it

which runs with MONAI, PyTorch and nibabel alone (no ``mstkd``)::

    python -m monai.bundle run --config_file OUT/configs/inference.json --meta_file OUT/configs/metadata.json \\
        --bundle_root OUT --dataset_dir CASES --output_dir PREDS

``CASES`` holds case folders (``<ID>/<ID>_flair.nii.gz``, ... or the BraTS 2023 naming, as the checkpoint was
trained); ``PREDS/<ID>.nii.gz`` are label maps in each case's own grid. The steps follow
:class:`mstkd.infer.Predictor`: reorient and resample to the training geometry, crop to the brain (non-zero in any
modality) with a 2-voxel margin, z-score each modality over that brain, sliding windows with Gaussian blending,
the class probabilities inverted back to the case's grid, then decoded (argmax, or each class above a threshold
for sigmoid outputs) into the label convention. Where they differ, at the voxel level:

- the network is traced with PyTorch's own convolutions, where ``mstkd`` runs batch-1 CPU convolutions through
  oneDNN: the logits agree to float32 rounding, so a voxel whose two likeliest classes tie to about 1e-6 can flip;
- the z-score statistics are computed in float64 here (float32 in ``mstkd``), a relative difference of ~1e-7;
- a case that needs resampling goes through MONAI's ``Orientation`` and ``Spacing`` with the brain mask as
  ``mstkd`` does, but its probabilities come back through ``Invertd`` (zeros beyond the brain's box and the grid,
  where ``mstkd`` pastes background and repeats the edge), and a case within 1 % of the target spacing is
  resampled here where ``mstkd`` keeps it as it is. Measured with a phantom-4 model on a phantom written at
  2 mm (the target 2.5 mm): 18 of 1,152,000 voxels differ; on a case at the target, none;
- all four modalities must be on disk (``mstkd predict`` zero-fills missing ones).

On CUDA, both run the network under bfloat16 autocast when the checkpoint trained with ``train.amp`` (the
bundle's ``amp``; ``--amp false`` turns it off); on CPU both run in float32. The GPU path has not been run here.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mstkd.atomic import check_writable, write_text
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint
from mstkd.data.cache import BRAIN_MARGIN
from mstkd.data.labels import CLASSES, get_convention
from mstkd.data.layouts import Layout, file_endings
from mstkd.errors import InputError
from mstkd.evaluate import resolve_decode
from mstkd.modalities import MODALITIES
from mstkd.provenance import package, sha256_of

FORMATS = ("monai-bundle",)
TRACE_TOLERANCE = 1e-4
"""Largest absolute logit difference allowed between the traced network and the checkpoint's on a random window."""


class _Segment(nn.Module):
    """The student's class logits, the one forward a sliding window calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.segment(x)


def export_bundle(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the MONAI bundle of ``checkpoint`` to the folder ``out`` (see the module docstring); returns ``out``.

    Raises:
        InputError: a bad checkpoint, an ``out`` that cannot be written or already holds files, or a network whose
            trace does not reproduce it.
    """
    out = Path(out)
    check_writable(out, what="OUT")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: not empty; export into a new folder")
    net, cfg, payload = load_checkpoint(checkpoint, "cpu")
    roi = [int(v) for v in (cfg.eval.roi or cfg.model.input_size)]
    settings = _settings(cfg, payload)  # every refusal before anything is written
    meta = metadata(settings, roi, sha256_of(checkpoint), Path(checkpoint).name)
    traced = _trace(net, roi)
    folder = out.resolve()  # an empty folder given (``.``, or through a link) keeps its place, owner and mode
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")
    try:  # built beside ``out``, then renamed into place: each part whole, or not there at all
        (tmp / "models").mkdir(parents=True)
        torch.jit.save(traced, str(tmp / "models" / "model.ts"))
        write_text(tmp / "configs" / "inference.json", json.dumps(inference_config(settings, roi), indent=2) + "\n")
        write_text(tmp / "configs" / "metadata.json", json.dumps(meta, indent=2) + "\n")
        write_text(tmp / "docs" / "README.md", _readme(settings))
        if folder.is_dir():
            for part in ("configs", "docs", "models"):  # the model last: a bundle without it is plainly unfinished
                os.replace(tmp / part, folder / part)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _trace(net: nn.Module, roi: list[int]) -> torch.jit.ScriptModule:
    """The student's segmentation forward traced at the window size, with PyTorch's own convolutions (the oneDNN
    route of :mod:`mstkd.model.conv` is a CPU training speed-up, not a portable op), checked against the original."""
    plain = copy.deepcopy(net).eval()
    for module in plain.modules():
        if isinstance(module, nn.Conv3d):
            module.__class__ = nn.Conv3d
    example = torch.randn(1, len(MODALITIES), *roi, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, fixed at the window size
        traced = torch.jit.trace(_Segment(plain), example, check_trace=False)
        gap = float((traced(example) - net.segment(example)).abs().max())
    if not gap <= TRACE_TOLERANCE:
        raise InputError(f"the traced network differs from the checkpoint's by {gap:.3g} in the logits")
    return traced


def _settings(cfg: Any, payload: dict) -> dict[str, Any]:
    """What the configs are written from: geometry, normalisation, activation, decoding, files and labels."""
    convention = get_convention(str(payload["convention"]))
    if str(cfg.data.normalization) != "zscore":
        raise InputError(f"data.normalization={cfg.data.normalization}: the bundle writes the z-score only")
    activation = str(cfg.loss.activation)
    decode = resolve_decode(str(cfg.eval.decode), activation)
    target = checkpoint_geometry(payload)
    layout = Layout.FETS if convention.name == "fets" else Layout.BRATS2023
    return {
        "convention": convention.name,
        "labels": {"NETC": convention.necrosis, "ED": convention.edema, "ET": convention.enhancing},
        "endings": [file_endings(layout)[m] for m in MODALITIES],
        "target": target.to_dict() if target else None,
        "activation": activation,
        "decode": decode,
        "threshold": float(cfg.eval.threshold),
        "overlap": float(cfg.eval.overlap),
        "blend": str(cfg.eval.blend),
        "sw_batch_size": int(cfg.eval.sw_batch_size),
        "amp": bool(cfg.train.amp),
    }


def inference_config(s: dict[str, Any], roi: list[int]) -> dict[str, Any]:
    """The bundle's ``inference.json``: MONAI's config syntax (``@`` references, ``$`` expressions)."""
    geometry = []
    if s["target"] is not None:
        geometry = [
            {
                "_target_": "Orientationd",
                "keys": "image",
                "axcodes": s["target"]["orientation"],
                "labels": [["L", "R"], ["P", "A"], ["I", "S"]],  # nibabel's axis codes, as mstkd's
            },
            # the brain mask travels as a fifth channel and zeroes what the interpolator leaves outside it
            {
                "_target_": "Lambdad",
                "keys": "image",
                "func": "$lambda x: torch.cat([x, (x != 0).any(0, keepdim=True)])",
            },
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": s["target"]["spacing"],
                "mode": "bilinear",
                "padding_mode": "zeros",
            },
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x[:-1] * (x[-1:] >= 0.5)"},
        ]
    lut = [s["labels"]["NETC"], s["labels"]["ED"], s["labels"]["ET"], 0]  # class index -> label, BG last
    if s["decode"] == "argmax":  # a voxel outside the brain's box (all probabilities 0 once padded back) is BG
        decode = "$lambda p: torch.as_tensor(@class_labels, device=p.device)[torch.cat([p[:3], p[3:] + (p.sum(0, keepdim=True) == 0)]).argmax(0, keepdim=True)]"  # noqa: E501
    else:  # ET above the threshold, else NETC (the rest of TC), else ED (the rest of WT), else background
        decode = "$lambda p: torch.where(p[2:3] > @threshold, @class_labels[2], torch.where(p[0:1] > @threshold, @class_labels[0], torch.where(p[1:2] > @threshold, @class_labels[1], 0)))"  # noqa: E501
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "/data/cases",
        "output_dir": "$@bundle_root + '/predictions'",
        "modality_endings": s["endings"],
        "class_labels": lut,
        "threshold": s["threshold"],
        "amp": s["amp"],
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$[{'image': [os.path.join(c, os.path.basename(c) + e + '.nii.gz') for e in @modality_endings]} for c in sorted(glob.glob(os.path.join(@dataset_dir, '*'))) if os.path.isdir(c)]",  # noqa: E501
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        "normalize": "$lambda x: (lambda m: torch.stack([((c.double() - c[m].double().mean()) / (lambda sd: sd if sd > 0 else 1.0)(c[m].double().std(unbiased=False))).float() * m if c.any() else c for c in x]))((x != 0).any(0))",  # noqa: E501
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                *geometry,
                {
                    "_target_": "CropForegroundd",
                    "keys": "image",
                    "source_key": "image",
                    "select_fn": "$lambda x: x != 0",
                    "margin": BRAIN_MARGIN,
                    "allow_smaller": True,
                },
                {"_target_": "Lambdad", "keys": "image", "func": "@normalize"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": s["sw_batch_size"],
            "overlap": s["overlap"],
            "mode": s["blend"],
        },
        "decode": decode,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", **{s["activation"]: True}},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "Lambdad", "keys": "pred", "func": "@decode"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_dtype": "$torch.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "output_name_formatter": "$lambda meta, saver: {'subject': os.path.basename(os.path.dirname(str(meta['filename_or_obj'])))}",  # noqa: E501
                },
            ],
        },
        # as mstkd.train.autocast: bfloat16 on a CUDA device that has it, when the model trained with amp
        "predictor": "$torch.autocast('cuda', dtype=torch.bfloat16, enabled=@amp and @device.type == 'cuda' and torch.cuda.is_bf16_supported())(lambda x: @network(x).float())",  # noqa: E501
        # no_grad as a decorator: grad mode stays as it was around the bundle (it may run inside another program)
        "segment": "$torch.no_grad()(lambda d: @postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), @predictor)[0].cpu()}))",  # noqa: E501
        "run": ["$[@segment(d) for d in @dataset]"],
    }


def metadata(s: dict[str, Any], roi: list[int], sha256: str, name: str) -> dict[str, Any]:
    """The bundle's ``metadata.json`` (MONAI's fields, and what ``mstkd`` records beside them)."""
    import monai
    import nibabel
    import numpy

    made = package()
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": made["version"],
        "changelog": {made["version"]: f"exported from {name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": "MST-KDNet student (brain tumour segmentation from any subset of FLAIR, T1, T1ce, T2)",
        "task": "Brain tumour segmentation: necrotic tumour core, oedema and enhancing tumour",
        "description": (
            "The student of an MST-KDNet teacher-student pair trained with mstkd (federated or centralised). It takes "
            "the four MRI modalities (absent ones zero-filled in training, so any subset is meaningful) and predicts "
            "four classes per voxel; the label map follows the label convention below."
        ),
        "authors": "mstkd",
        "copyright": "see the mstkd repository",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(MODALITIES),
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): m.upper() if m != "t1ce" else "T1ce" for i, m in enumerate(MODALITIES)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(CLASSES),
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): c for i, c in enumerate(CLASSES)},
                }
            },
        },
        "mstkd": {
            "checkpoint": name,
            "checkpoint_sha256": sha256,
            "package": made,
            "label_convention": s["convention"],
            "labels": s["labels"],
            "modality_files": dict(zip(MODALITIES, s["endings"], strict=True)),
            "target_geometry": s["target"],
            "activation": s["activation"],
            "decode": s["decode"],
            "threshold": s["threshold"],
            "amp": s["amp"],
        },
    }


def _readme(s: dict[str, Any]) -> str:
    endings = ", ".join(f"`<ID>{e}.nii.gz`" for e in s["endings"])
    labels = ", ".join(f"{k} {v}" for k, v in s["labels"].items())
    return f"""# MST-KDNet student as a MONAI bundle

Exported by `mstkd export`. It needs PyTorch, MONAI and nibabel, not `mstkd`.

```bash
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/cases --output_dir /path/to/predictions
```

- **Input:** one folder per case under `dataset_dir`, holding {endings} (all four).
  Other file names: `--modality_endings "['_flair', '_t1', '_t1ce', '_t2']"`.
- **Output:** `<ID>.nii.gz` per case, in the case's own grid and affine; labels {labels}, background 0
  (`--class_labels` sets them, in the order NETC, ED, ET, background).
- **Steps:** the case is reoriented and resampled to the training geometry
  ({s["target"] or "none stored: each case at its own voxel size"}), cropped to the brain, z-scored per
  modality over the brain, segmented by sliding windows, and its class probabilities ({s["activation"]}) are
  inverted back to the case's grid before they are decoded ({s["decode"]}).
- `configs/metadata.json` records the checkpoint's sha256 and what it was made with.
"""
