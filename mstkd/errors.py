"""The exception types for bad input and refused data, and what of an error may leave a site.

Anything a user can fix (a missing file, a corrupt NIfTI, a wrong label value, an
unknown case in a CSV) raises :class:`InputError` with a one-line message that names
the file and what is wrong. The ``mstkd`` command turns it into ``error: <message>``
on stderr and exit status 2; every other exception is a bug and keeps its traceback.

A federated node keeps such messages to itself: they name files and cases. What it tells the
server is :func:`public_reason`: a category and a short code written here, never text that came
from data, a path or the environment.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input that the user can fix; the message is one line, naming the file."""

    public = "input: the node's data or configuration was refused (details in the node's log)"


class NoUsableCases(InputError):
    """A site with no case left to train on (every one missing, unreadable or broken)."""

    public = "data: no usable training case (details in the node's log)"


class RefusedMessage(InputError):
    """A node refuses what a message asked of it. The message text is written by this project, from no data:
    it is what the server is told (e.g. "global model not finite")."""

    @property
    def public(self) -> str:
        return f"node refused: {self}"


class NonFiniteState(ValueError):
    """Weights or optimiser moments that are NaN or infinite: never saved, never restored."""

    public = "node refused: non-finite local state, not saved"


class NonFiniteUpdate(ValueError):
    """Training left NaN or infinite weights, or took no finite step at all: nothing is sent."""

    public = "training diverged: non-finite loss, gradients or update; nothing sent"


KNOWN = {cls.__name__: cls for cls in (InputError, NoUsableCases, RefusedMessage, NonFiniteState, NonFiniteUpdate)}
"""The exceptions that cross from a node's worker to its ClientApp as themselves (by name, never pickled)."""


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def public_reason(exc: BaseException) -> str:
    """What a node may tell the server about ``exc``: a category and a short code, nothing from data, paths or
    the environment (those stay in the node's own log)."""
    public = getattr(exc, "public", None)
    if isinstance(public, str):
        return public
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError":  # torch's CUDA out-of-memory error
        return "resources: out of memory"
    if isinstance(exc, OSError):
        return "io: a file could not be read or written (details in the node's log)"
    return f"internal: {name} (details in the node's log)"


def read_json_object(path: Path, max_bytes: int) -> dict[str, Any]:
    """A JSON object from a file that may come from elsewhere: a plain file (not a FIFO, whose read would wait for
    ever) of at most ``max_bytes``, read as data.

    Raises:
        InputError: ``path`` is not such a file: missing, not plain, too large, not JSON (nested past the parser's
            depth included), or not an object; one line naming it.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a plain file")
        if info.st_size > max_bytes:
            raise InputError(f"{path}: larger than {max_bytes >> 20} MiB")
        value = json.loads(path.read_bytes())
    except InputError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not JSON ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object")
    return value
