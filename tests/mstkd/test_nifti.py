"""Hostile NIfTI files at :mod:`mstkd.data.nifti`: each attack is built as a file from elsewhere would hold it, and
each refusal is one line that costs its file only (the scoring side of these is in ``test_metrics.py``)."""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mstkd.data import nifti
from mstkd.data.cases import load_case
from mstkd.data.labels import get_convention
from mstkd.data.layouts import detect_case
from mstkd.data.nifti import MAX_VOX_OFFSET, read_header, read_labels, read_volume, write_volume
from mstkd.errors import InputError
from mstkd.metrics import score_files, score_labels
from tests.helpers import AFFINE, make_labels, tiny_checkpoint, write_case, write_nifti

PATIENT = b"PatientName=DOE^JANE PatientID=0012345"


def with_extension(path: Path, size: int, *, kind=nib.Nifti1Header, order: str = "<", vox_offset: int | None = None):
    """A 16^3 uint8 volume with one comment extension of ``size`` bytes (gzip makes megabytes of it a few KB), its
    header written byte by byte as any tool could (``vox_offset``: where its voxels start, by default after it)."""
    header = kind(endianness=order)
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    start = header.sizeof_hdr + 4
    header["vox_offset"] = start + size if vox_offset is None else vox_offset
    body = PATIENT + b"A" * (size - 8 - len(PATIENT))
    raw = header.binaryblock + b"\x01\0\0\0" + struct.pack(f"{order}ii", size, 6) + body + bytes(16**3)
    with gzip.open(path, "wb", 1) if path.name.endswith(".gz") else path.open("wb") as f:
        f.write(raw)
    return path


@pytest.mark.parametrize(
    "name,kind,order",
    [("a.nii.gz", nib.Nifti1Header, "<"), ("a.nii", nib.Nifti1Header, "<"), ("a.nii.gz", nib.Nifti1Header, ">")]
    + [("a.nii.gz", nib.Nifti2Header, "<")],
)
def test_header_extensions_past_a_mebibyte_are_refused_before_nibabel_reads_them(
    tmp_path, monkeypatch, name, kind, order
):
    """nibabel reads every extension into memory up to the voxels: two 1 GB comments in a 1.9 MB .nii.gz passed
    the header check at 2 GB of memory. The fixed header is read first, and nibabel never sees such a file."""
    small = with_extension(tmp_path / f"small-{name}", 4096, kind=kind, order=order)
    assert read_header(small).shape == (16, 16, 16)  # real extensions (an AFNI or DICOM header) take kilobytes
    bomb = with_extension(tmp_path / name, 2 * MAX_VOX_OFFSET, kind=kind, order=order)
    assert bomb.stat().st_size < MAX_VOX_OFFSET // 64 or name.endswith(".nii")  # gzip: a few KB for 2 MiB

    def never(*args, **kwargs):
        raise AssertionError("nibabel was asked to read a file whose header was refused")

    monkeypatch.setattr(nifti.nib, "load", never)
    for read in (read_header, read_volume, read_labels):
        with pytest.raises(InputError, match=rf"^{re.escape(str(bomb))}: its voxels start at byte .*, past") as err:
            read(bomb)
        assert "\n" not in str(err.value)


def test_extensions_announced_with_no_room_before_the_voxels_are_refused(tmp_path, monkeypatch):
    """A ``vox_offset`` below the header's end with the extension flag set makes nibabel read extensions to the
    end of the file, however long it is."""
    bomb = with_extension(tmp_path / "a.nii.gz", 2 * MAX_VOX_OFFSET, vox_offset=0)
    monkeypatch.setattr(nifti.nib, "load", lambda *a, **k: pytest.fail("nibabel read a refused file"))
    with pytest.raises(InputError, match="announces extensions but its voxels start at byte 0$"):
        read_header(bomb)


def test_an_extension_claiming_more_than_lies_before_the_voxels_is_refused(tmp_path, monkeypatch):
    """nibabel believes each extension's own size: one claiming 200 MiB, in a file whose voxels start at byte 368,
    was read whole (and the rest of the file with it) although ``vox_offset`` was within the bound."""
    import gzip
    import struct

    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 368
    path = tmp_path / "claims.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", 200 * 2**20, 6) + bytes(8) + bytes(64))
    monkeypatch.setattr(nifti.nib, "load", lambda *a, **k: pytest.fail("nibabel read a refused file"))
    with pytest.raises(InputError, match="a header extension claims 209715200 bytes"):
        read_header(path)


def test_a_zero_length_axis_is_refused_in_one_line(tmp_path):
    """A (0, 16, 16) volume passed the header check, then stopped ``mstkd score`` with numpy's ValueError."""
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((0, 16, 16), np.uint8))
    for read in (read_header, read_volume, read_labels):
        with pytest.raises(
            InputError, match=r"empty\.nii\.gz: its header claims an empty axis \(shape \(0, 16, 16\)\)$"
        ):
            read(empty)


def zooms_file(path: Path, data: np.ndarray, zooms) -> Path:
    """A file whose header voxel size (``pixdim``) is ``zooms`` over a 1 mm affine (its sform; no qform)."""
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_zooms(zooms)
    img.header["qform_code"] = 0
    nib.save(img, path)
    return path


def test_a_header_voxel_size_that_is_not_the_affines_is_refused(tmp_path):
    """Distances (HD95) came from the header's voxel size, the grid from the affine: a reference whose pixdim said
    10 mm over a 1 mm affine gave an HD95 of 20.0 mm for a 2 mm error, with no word."""
    labels = make_labels((32, 32, 32))
    shifted = np.roll(labels, 2, axis=0)
    pred = zooms_file(tmp_path / "pred.nii.gz", shifted, (1.0, 1.0, 1.0))
    ref = zooms_file(tmp_path / "ref.nii.gz", labels, (10.0, 10.0, 10.0))
    with pytest.raises(
        InputError, match=r"ref\.nii\.gz: its header's voxel size 10 x 10 x 10 mm is not its affine's 1 x"
    ):
        score_files(pred, ref, labels="fets")
    # a difference under 1 % (float32 rounding, a qform and an sform written apart) is read, and scored, as before
    near = zooms_file(tmp_path / "near.nii.gz", labels, (1.005, 1.0, 0.996))
    expected = score_labels(shifted, labels, get_convention("fets"), tuple(nib.load(near).header.get_zooms()))
    assert score_files(pred, near, labels="fets") == expected


def test_a_label_map_is_read_as_one_byte_a_voxel_and_scores_the_same(tmp_path):
    """Label maps were read as float64 (8 bytes a voxel) to be checked; they are read as uint8 once their values are
    whole numbers in 0..255, which changes no score."""
    labels = make_labels((32, 30, 20))
    for dtype in (np.uint8, np.int16, np.float32, np.float64):
        path = write_nifti(tmp_path / f"{np.dtype(dtype).name}.nii.gz", labels.astype(dtype))
        assert read_labels(path).data.dtype == np.uint8
    pred = write_nifti(tmp_path / "pred.nii.gz", np.roll(labels, 1, axis=1).astype(np.float32))
    ref = write_nifti(tmp_path / "ref.nii.gz", labels.astype(np.float64))
    spacing = tuple(float(z) for z in nib.load(ref).header.get_zooms())
    expected = score_labels(np.roll(labels, 1, axis=1), labels, get_convention("fets"), spacing)
    assert score_files(pred, ref, labels="fets") == expected


MEMORY_PROBE = """
import resource, sys
from mstkd.data.nifti import read_volume
from mstkd.errors import InputError
read_volume(sys.argv[2])  # everything a read loads on first use, loaded
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    read_volume(sys.argv[1])
except InputError as exc:
    print("InputError:", exc)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to bound the memory")
def test_a_volume_too_large_for_the_memory_left_is_its_files_error_not_a_traceback(tmp_path):
    """The cast to float32 sat outside the check that turns a failed allocation into one line: a 64 MB uint8 volume
    (read in about twice that) whose float32 copy (256 MB) did not fit ended the run with numpy's MemoryError."""
    shape = (400, 400, 400)
    big = write_nifti(tmp_path / "big.nii.gz", np.zeros(shape, np.uint8))
    small = write_nifti(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.uint8))
    left = 3 * math.prod(shape)  # room for the file's bytes as read, not for their float32 copy
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    probe = [sys.executable, "-c", MEMORY_PROBE, str(big), str(small), str(left)]
    run = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"InputError: {big}: not enough memory to read its 6.4e+07 voxels"


def test_no_written_volume_carries_an_inputs_header_extensions(tmp_path):
    """``mstkd predict`` copied its input's header, extensions included, into every label map: a 200 MB extension
    came out in the output, and an extension can hold a DICOM header with the patient's name."""
    from mstkd.infer import Predictor

    case = write_case(tmp_path / "cases", "FeTS2022_00001", shape=(24, 24, 16), seg=False)
    for image in sorted(case.glob("*.nii.gz")):
        img = nib.load(image)
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, PATIENT + b" " * 4000))
        img.header["aux_file"], img.header["intent_name"] = PATIENT[:23], PATIENT[:15]  # free-text fields too
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), image)
        assert PATIENT in gzip.decompress(image.read_bytes())
    out = tmp_path / "FeTS2022_00001.nii.gz"
    Predictor(tiny_checkpoint(tmp_path), "cpu").predict(case, out)
    raw = gzip.decompress(out.read_bytes())
    assert PATIENT[:15] not in raw and raw[348:352] == bytes(4) and struct.unpack("<f", raw[108:112]) == (352.0,)
    volume = read_volume(next(case.glob("*_flair.nii.gz")))
    copied = write_volume(tmp_path / "copy.nii.gz", volume.data, volume.affine, nib.load(volume.path).header)
    assert PATIENT[:15] not in gzip.decompress(copied.read_bytes())  # whatever header a caller hands the writer


def test_a_case_whose_label_map_holds_a_million_distinct_values_says_so_in_one_short_line(tmp_path):
    """The error listed every refused value: a 64^3 map of distinct values made a 2 MB "one line"."""
    folder = write_case(tmp_path, "FeTS2022_00001", shape=(64, 64, 64))
    write_nifti(folder / "FeTS2022_00001_seg.nii.gz", np.arange(64**3, dtype=np.int32).reshape(64, 64, 64), AFFINE)
    with pytest.raises(InputError) as err:
        load_case(detect_case(folder))
    message = str(err.value)
    assert "label values 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, ... (262140 values) are not allowed" in message
    assert len(message) < 300 and "\n" not in message
