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


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    """The temporary name was ``.<name>.<pid>.tmp<suffix>``: whoever could write the folder could plant a link there
    for a range of process ids, and the next write went through it to a file of their choice."""
    from mstkd.atomic import write_text

    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    for pid in (os.getpid(), *range(1, 200)):
        (folder / f".REPORT.md.{pid}.tmp.md").symlink_to(outside)
    old = os.umask(0o022)
    try:
        write_text(folder / "REPORT.md", "report")
    finally:
        os.umask(old)
    assert outside.read_text() == "precious"
    report = folder / "REPORT.md"
    assert not report.is_symlink() and report.read_text() == "report"
    assert report.stat().st_mode & 0o777 == 0o644  # a new file's usual mode, as before


def test_a_temporary_name_fits_any_file_name_and_its_leftovers_are_found_by_name_not_pattern(tmp_path):
    from mstkd.atomic import atomic_path, stale_temporaries, write_text

    long = tmp_path / ("L" * 240 + ".nii.gz")  # 247 bytes: the temporary name adds about 40
    write_text(long, "x")
    assert long.read_text() == "x"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "Patient[01].nii.gz"):
        raise RuntimeError("killed")  # nothing is left; then what a killed writer of each case would leave
    left = {}
    for name in ("Patient[01].nii.gz", "Patient0.nii.gz", "Patient0.nii.gz.v2.nii.gz", long.name, "key"):
        with atomic_path(tmp_path / name) as tmp:
            left[name] = tmp
        tmp.write_text("half")  # what a writer killed before its rename leaves
    (tmp_path / ".key.77.tmp").write_text("half")  # the temporary name an earlier version wrote
    for name, orphan in left.items():
        expected = [orphan, tmp_path / ".key.77.tmp"] if name == "key" else [orphan]
        assert orphan.name.startswith(".") and stale_temporaries(tmp_path / name) == sorted(expected), name
