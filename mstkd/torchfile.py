"""Files that ``torch.save`` wrote and that may come from elsewhere: checkpoints, a run's ``state.pt``, a node's state.

``torch.load(weights_only=True)`` runs no code, but it trusts the archive: it reads each record whole, at the size the
zip's directory claims, before it checks anything, and it inflates deflated records although ``torch.save`` never
writes one. So an 11 MB checkpoint of zeros deflated (a zip bomb), or one whose records all point at the same bytes,
allocated gigabytes. :func:`archive_problem` reads the zip's directory alone and refuses such a file before
``torch.load`` opens it: every record stored as it is, and their sizes adding up to no more than the file's own, so
what ``torch.load`` allocates is bounded by the bytes on disk.

What it returns is then checked against what this version builds, before any memory is spent on a network or any
data is read: :func:`check_weights` for a network's state dict (names and shapes, against the network built on the
``meta`` device, then each tensor: dense, holding its values, of a real floating type or the buffer's own integer
type, and finite), :func:`check_optimizer` for an optimiser's (its settings, and its moments' shapes) and
:func:`check_tensors` for any other tensors (random states). Each refusal is one line that names the entry.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from mstkd.errors import InputError


def archive_problem(path: str | Path) -> str:
    """Why ``path`` is not a zip archive as ``torch.save`` writes it (its records stored uncompressed, their sizes
    adding up to no more than the file), or ``""`` when it is. Reads the zip's directory only."""
    try:
        size = Path(path).stat().st_size
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception as exc:  # zipfile raises many types for a file that is not a zip archive
        return f"not a zip archive as torch.save writes ({type(exc).__name__})"
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            return f"its record {record.filename[:80]!r} is compressed; torch.save stores every record as it is"
    if (total := sum(record.file_size for record in records)) > size:
        return f"its records claim {total} bytes, more than the file's {size}"
    return ""


def tensor_problem(value: torch.Tensor, like: torch.Tensor | None = None) -> str:
    """Why ``value`` cannot be used (as ``like``, a tensor of the network being loaded, when given), or ``""``.

    It must be dense, hold its values (not ``meta``, and no more elements than its storage: an expanded view of one
    number can claim any size), and be real: where ``like`` is floating, of a floating type and finite once cast to
    ``like``'s type (a float64 of 1e300 is inf in float32); where ``like`` is an integer buffer, of its type; with no
    ``like``, not complex or quantized, and finite where floating.
    """
    if value.layout != torch.strided:
        return f"not a dense tensor ({value.layout})"
    if value.is_meta:
        return "a tensor without values (meta)"
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        return "a view claiming more values than it stores"
    if like is not None and like.is_floating_point():
        if not value.is_floating_point():
            return f"of type {value.dtype}, not floating point"
        return "" if bool(torch.isfinite(value.to(like.dtype)).all()) else "not finite"
    if like is not None:
        return "" if value.dtype == like.dtype else f"of type {value.dtype}, not {like.dtype}"
    if value.is_complex() or value.is_quantized:
        return f"of type {value.dtype}, not real numbers"
    return "not finite" if value.is_floating_point() and not bool(torch.isfinite(value).all()) else ""


def check_weights(stored: object, expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict that does not fit ``expected`` (a network's, best built on the ``meta`` device): other
    names or shapes, or a tensor that :func:`tensor_problem` refuses. ``what`` begins each message ("x.pt: its
    student").

    Raises:
        InputError: one line naming the first tensor that does not fit.
    """
    if not isinstance(stored, Mapping) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
        raise InputError(f"{what} is not a set of named tensors")
    shapes = {k: tuple(v.shape) for k, v in stored.items()}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != wanted:
        odd = sorted(map(str, set(shapes) ^ set(wanted))) or [k for k in wanted if shapes[k] != wanted[k]]
        raise InputError(f"{what} does not fit the network its config describes (first: {odd[0][:80]!r})")
    for name, like in expected.items():
        if problem := tensor_problem(stored[name], like):
            raise InputError(f"{what}: {name!r} is {problem}")


def check_tensors(value: object, what: str) -> None:
    """Refuse any tensor that :func:`tensor_problem` refuses in ``value`` (nested mappings, lists and tuples, as
    ``torch.load`` returns them: an optimiser's state, random states). Walked without recursion and each container
    once, so neither deep nesting nor a list that holds itself stops it.

    Raises:
        InputError: one line naming ``what`` and the key of the first tensor refused.
    """
    stack, seen = [("", value)], set()
    while stack:
        key, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if problem := tensor_problem(node):
                raise InputError(f"{what}: {key or 'a tensor'} is {problem}")
        elif isinstance(node, Mapping | list | tuple) and id(node) not in seen:
            seen.add(id(node))
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            stack.extend((repr(k)[:80], v) for k, v in items)


def check_optimizer(
    stored: object, optimizer: torch.optim.Optimizer, what: str, scheduled: tuple[str, ...] = ()
) -> None:
    """Refuse an optimiser's state dict that ``optimizer`` (fresh, best over ``meta`` parameters) would not have
    written, and load it into ``optimizer``: a tensor :func:`check_tensors` refuses, other groups or group sizes, a
    setting other than its own (``maximize``, ``betas``, ...; ``scheduled`` ones aside, which training sets), a key
    that is no parameter, or a parameter's state that is not tensors of its shape or scalars (``load_state_dict``
    compares none but the groups).

    Raises:
        InputError: one line naming the first setting or key that does not fit.
    """
    check_tensors(stored, what)
    own = [{k: v for k, v in g.items() if k != "params" and k not in scheduled} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(stored)  # type: ignore[arg-type]
        groups = optimizer.param_groups
        odd = [k for group, mine in zip(groups, own, strict=True) for k, v in mine.items() if group.get(k) != v]
        params = [p for group in groups for p in group["params"]]
        known = {id(p) for p in params}  # the parameters are alive, so no other key shares an id with one
        odd += [k for k in optimizer.state if id(k) not in known]
        for p in params:
            moments = optimizer.state.get(p, {})
            items = moments.items() if isinstance(moments, Mapping) else [("its moments", None)]
            odd += [k for k, v in items if not isinstance(v, torch.Tensor) or v.shape not in (p.shape, ())]
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        odd = [type(exc).__name__]
    if odd:
        raise InputError(f"{what} does not fit its config ({str(odd[0])[:80]})")
