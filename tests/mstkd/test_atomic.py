"""Durable writes (mstkd.atomic): flushed, and nothing left behind when they fail."""

from __future__ import annotations

import os

import pytest


def test_atomic_writes_are_flushed_and_leave_nothing_behind_when_they_fail(tmp_path, monkeypatch):
    import mstkd.atomic as atomic

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    atomic.write_text(tmp_path / "a.txt", "hello")
    assert str(tmp_path) in synced and any(s.startswith(str(tmp_path / ".a.txt.")) for s in synced)
    synced.clear()
    atomic.write_bytes(tmp_path / "key", b"k" * 10, private=True)
    assert str(tmp_path) in synced  # the folder, after the rename

    def failing_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "b", b"data")
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "c.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "key"]
