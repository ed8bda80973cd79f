"""The weights that travel between a site and the server: the student (``student.*``) and the style
discriminator (``disc.*``), float tensors only, in the run's transport dtype. The teacher and every optimiser
state stay on the site.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from mstkd.runconfig import Transport

STUDENT, DISC = "student.", "disc."
TRANSPORT_DTYPES = {Transport.FLOAT16: np.float16, Transport.FLOAT32: np.float32}


def federated_arrays(
    student: nn.Module, discriminator: nn.Module, dtype: Transport = Transport.FLOAT32
) -> dict[str, np.ndarray]:
    """``student.*`` and ``disc.*`` float tensors as numpy arrays in ``dtype`` (ordered by name)."""
    out = {}
    for prefix, module in ((STUDENT, student), (DISC, discriminator)):
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                out[prefix + key] = value.detach().cpu().numpy().astype(TRANSPORT_DTYPES[dtype])
    return dict(sorted(out.items()))


def load_federated_arrays(student: nn.Module, discriminator: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``student.*`` and ``disc.*`` arrays (any float dtype) into the two modules; refuse anything else."""
    parts: dict[str, dict[str, torch.Tensor]] = {STUDENT: {}, DISC: {}}
    for key, value in arrays.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected array {key!r}: only student.* and disc.* are federated")
        value = np.asarray(value, dtype=np.float32)
        parts[prefix][key[len(prefix) :]] = torch.from_numpy(value if value.flags.writeable else value.copy())
    for prefix, module in ((STUDENT, student), (DISC, discriminator)):
        state = module.state_dict()
        missing = [k for k, v in state.items() if v.is_floating_point() and k not in parts[prefix]]
        if missing:
            raise ValueError(f"federated arrays lack {prefix}{missing[0]}")
        for key, value in parts[prefix].items():
            state[key].copy_(value.to(state[key].dtype))
