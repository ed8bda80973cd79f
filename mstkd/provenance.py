"""Where a result came from: the package version, the code's commit and a file's digest."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from mstkd import __version__

ROOT = Path(__file__).resolve().parents[1]


def code_commit(root: Path = ROOT) -> str:
    """The commit the code runs at: its sha, with ``-dirty`` when tracked files (published benchmark results
    aside) differ from it; empty outside a git checkout (an installed package)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        except OSError:  # no git on this machine
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    sha = git("rev-parse", "HEAD")
    if not sha:
        return ""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!simulations/results")
    return sha + ("-dirty" if dirty else "")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package() -> dict[str, str]:
    """This package's version and the commit of its code."""
    return {"version": __version__, "commit": code_commit()}
