"""Files that torch.save wrote, from elsewhere (mstkd.torchfile): a zip bomb is refused before torch.load reads a
byte of it, by every loader (a checkpoint, a run's state.pt, a node's state), and a tensor that is not dense, real
and finite is refused by name."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from client.state import SiteState
from mstkd.centralised import resume_centralised
from mstkd.checkpoint import load_checkpoint
from mstkd.cli import main
from mstkd.errors import InputError
from mstkd.torchfile import archive_problem, check_tensors, tensor_problem
from tests.helpers import tiny_checkpoint, write_case

CLAIM = 200 << 20
"""What a bomb's records claim: 200 MB, from a file of about 2 MB (the tiny checkpoint it is made from)."""

MB = 1 << 20


def _deflated_zeros(data: bytes, megabytes: int) -> tuple[bytes, int]:
    """``data`` followed by ``megabytes`` MB of zeros, deflated, and its CRC: one MB is deflated once and its
    fully flushed block repeated, so the bomb is built without ever holding what it claims."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(MB)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(data)
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return head + block * megabytes + deflate.flush(), crc


def _write_zip(path: Path, records: list[tuple[str, bytes, int]], aliases: list[tuple[str, str]] = ()) -> Path:
    """A zip archive written byte by byte: ``records`` are (name, bytes, MB of zeros after them; deflated when
    more than 0, else stored), ``aliases`` (name, record) are directory entries that point at a record's bytes."""
    out, where = bytearray(), {}
    for name, data, megabytes in records:
        body, crc = _deflated_zeros(data, megabytes) if megabytes else (data, zlib.crc32(data))
        method, size = (8, len(data) + megabytes * MB) if megabytes else (0, len(data))
        where[name] = (len(out), crc, method, len(body), size)
        n = name.encode()
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(body), size, len(n), 0) + n + body
    directory = bytearray()
    for name, of in [(r[0], r[0]) for r in records] + list(aliases):
        offset, crc, method, stored, size = where[of]
        n = name.encode()
        fields = (0x02014B50, 20, 20, 0, method, 0, 0, crc, stored, size, len(n), 0, 0, 0, 0, 0, offset)
        directory += struct.pack("<IHHHHHHIIIHHHHHII", *fields) + n
    count = len(records) + len(aliases)
    out += directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), len(out), 0)
    path.write_bytes(bytes(out))
    return path


def _bomb(good: Path, path: Path, kind: str) -> Path:
    """``good`` (a file torch.save wrote) made a bomb: its biggest record deflated with CLAIM bytes of zeros after it
    (``deflated``, as an audit's 11 MB checkpoint that took 4.3 GB), or directory entries that all point at that
    record's bytes until they claim CLAIM bytes (``shared``)."""
    with zipfile.ZipFile(good) as archive:
        records = [(r.filename, archive.read(r.filename)) for r in archive.infolist()]
    biggest = max(records, key=lambda r: len(r[1]))[0]
    if kind == "deflated":
        return _write_zip(path, [(n, d, CLAIM // MB if n == biggest else 0) for n, d in records])
    shares = CLAIM // len(dict(records)[biggest])
    return _write_zip(path, [(n, d, 0) for n, d in records], [(f"{biggest}.{i}", biggest) for i in range(shares)])


@pytest.fixture
def torch_load_never_called(monkeypatch):
    """The calls torch.load got: a bomb must be refused before it (which would allocate what the records claim)."""
    calls = []

    def spy(path, *args, **kwargs):
        calls.append(path)
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", spy)
    return calls


REASON = {"deflated": "is compressed; torch.save stores every record as it is", "shared": "more than the file's"}


@pytest.mark.parametrize("kind", REASON)
def test_a_zip_bomb_is_refused_by_every_loader_before_torch_reads_it(tmp_path, kind, capsys, torch_load_never_called):
    bomb = _bomb(tiny_checkpoint(tmp_path), tmp_path / "bomb.pt", kind)
    assert bomb.stat().st_size < CLAIM // 50
    with zipfile.ZipFile(bomb) as archive:
        assert sum(r.file_size for r in archive.infolist()) >= CLAIM
    with pytest.raises(InputError, match=f"bomb.pt: not a readable checkpoint \\(.*{REASON[kind]}"):
        load_checkpoint(bomb)

    case = write_case(tmp_path / "cases", "FeTS2022_00001", seg=False)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(bomb), "--case", str(case), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and REASON[kind] in err[0] and not out.exists(), err

    run = tmp_path / "run"  # mstkd train --resume: a run folder copied in
    run.mkdir()
    (run / "state.pt").write_bytes(bomb.read_bytes())
    with pytest.raises(InputError, match=f"state.pt: not a readable training state \\(.*{REASON[kind]}"):
        resume_centralised(run, tmp_path / "cases", progress=False)

    node = SiteState(tmp_path / "node")  # a node's own state, damaged or replaced
    node.path.parent.mkdir()
    node.path.write_bytes(bomb.read_bytes())
    with pytest.raises(InputError, match=f"local.pt: not readable as node state \\(.*{REASON[kind]}"):
        node.info(node.path)
    assert torch_load_never_called == []


def test_what_torch_save_writes_passes_and_what_it_never_writes_is_refused(tmp_path):
    good = tiny_checkpoint(tmp_path)
    assert archive_problem(good) == ""
    torch.save({"x": torch.zeros(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for path in (tmp_path / "legacy.pt", tmp_path / "missing.pt"):
        assert archive_problem(path).startswith("not a zip archive as torch.save writes")
    with zipfile.ZipFile(good) as archive, zipfile.ZipFile(tmp_path / "small.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for record in archive.infolist():  # deflated, but claiming no more than it holds: still never torch.save's
            out.writestr(record.filename, archive.read(record.filename))
    assert "is compressed" in archive_problem(tmp_path / "small.pt")


def test_a_tensor_is_refused_unless_dense_holding_its_values_real_and_finite():
    weight = torch.ones(2, 3)
    odd = {
        "not finite": weight.clone().fill_(float("nan")),
        "not a dense tensor": weight.to_sparse(),
        "without values (meta)": torch.empty(2, 3, device="meta"),
        "claiming more values than it stores": torch.zeros(1).expand(2, 3),
        "not floating point": weight.to(torch.int64),
    }
    for reason, value in odd.items():
        assert reason in tensor_problem(value, weight), reason
    assert "not finite" in tensor_problem(weight.double().fill_(1e300), weight)  # inf once it is float32
    assert "not torch.int64" in tensor_problem(torch.tensor(3.0), torch.tensor(3))  # BatchNorm's counter
    assert "not real numbers" in tensor_problem(weight.to(torch.complex64))
    assert tensor_problem(weight.half(), weight) == tensor_problem(torch.tensor(3), torch.tensor(2)) == ""
    loop = []
    loop.append(loop)  # a list that holds itself, and nesting deeper than Python's recursion limit
    deep = [torch.zeros(1)]
    for _ in range(5000):
        deep = [deep]
    check_tensors({"loop": loop, "deep": deep, "rng": torch.zeros(8, dtype=torch.uint8)}, "state")
    with pytest.raises(InputError, match=r"^state: 'exp_avg' is not finite$"):
        check_tensors({"state": {0: {"exp_avg": torch.tensor([float("inf")])}}, "deep": deep}, "state")
