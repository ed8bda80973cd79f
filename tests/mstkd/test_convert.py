"""``mstkd convert``: an MSD task (4-D images) or an nnU-Net raw dataset (a file per channel, region labels) as
FeTS-named case folders, mapped by the names in ``dataset.json``; what it refuses; one bad case costs itself."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from mstkd.cli import main
from mstkd.data.convert import convert_dataset, read_dataset
from mstkd.data.dataset import prepare_federation
from mstkd.data.labels import CONVENTIONS, regions_from_labels
from mstkd.data.layouts import detect_case
from mstkd.errors import InputError
from tests.helpers import AFFINE, make_labels

SHAPE = (20, 18, 14)
MSD = {
    "name": "BRATS",
    "modality": {"0": "T2w", "1": "FLAIR", "2": "t1gd", "3": "T1w"},  # not the project's order: mapped by name
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}
NNUNET = {
    "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "file_ending": ".nii.gz",
}
ON_DISK = {"edema": 1, "necrosis": 2, "enhancing": 3}
"""How both datasets store the labels (nnU-Net's BraTS conversion, and MSD Task01)."""


def save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def source_labels(seed: int) -> np.ndarray:
    """A label map in the datasets' own values: the FeTS phantom labels 1 (necrosis), 2 (edema), 4 (enhancing)."""
    fets = make_labels(SHAPE, enhancing=4, offset=seed)
    out = np.zeros(SHAPE, np.uint8)
    out[fets == 1], out[fets == 2], out[fets == 4] = ON_DISK["necrosis"], ON_DISK["edema"], ON_DISK["enhancing"]
    return out


def channel(i: int, seed: int) -> np.ndarray:
    return np.random.default_rng(10 * seed + i).normal(100 * (i + 1), 5, SHAPE).astype(np.float32)


def msd(root, cases=2):
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(MSD))
    for k in range(cases):
        save(root / "imagesTr" / f"BRATS_{k:03d}.nii.gz", np.stack([channel(i, k) for i in range(4)], axis=-1))
        save(root / "labelsTr" / f"BRATS_{k:03d}.nii.gz", source_labels(k))
    (root / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"\0" * 64)  # the archive's macOS copies
    return root


def nnunet(root, cases=2):
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(NNUNET))
    for k in range(cases):
        for i in range(4):
            save(root / "imagesTr" / f"BraTS2021_{k:05d}_{i:04d}.nii.gz", channel(i, k))
        save(root / "labelsTr" / f"BraTS2021_{k:05d}.nii.gz", source_labels(k))
    return root


def same_regions(converted_seg, seed: int) -> bool:
    """The converted map's ET, TC and WT are the source's (ET = enhancing, TC = necrosis + ET, WT = all three)."""
    src = source_labels(seed)
    expected = np.stack(
        [src == ON_DISK["enhancing"], np.isin(src, [ON_DISK["necrosis"], ON_DISK["enhancing"]]), src > 0]
    )
    return bool((regions_from_labels(converted_seg, CONVENTIONS["fets"]) == expected).all())


def test_an_msd_task_becomes_fets_case_folders_by_its_channel_and_label_names(tmp_path):
    src, out = msd(tmp_path / "Task01_BrainTumour"), tmp_path / "data"
    result = convert_dataset(src, out, progress=False)
    assert result.written == ["BRATS_000", "BRATS_001"] and not result.failed
    for k, case_id in enumerate(result.written):
        files = detect_case(out / case_id)
        assert files.layout == "fets" and files.available == ("flair", "t1", "t1ce", "t2")
        for i, modality in enumerate(("t2", "flair", "t1ce", "t1")):
            img = nib.load(files.images[modality])
            assert img.shape == SHAPE and np.allclose(img.affine, AFFINE)
            assert np.array_equal(np.asarray(img.dataobj), channel(i, k))
        seg = np.asarray(nib.load(files.seg).dataobj)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4} and same_regions(seg, k)
    record = json.loads((out / "convert.json").read_text())
    assert record["labels"] == {"0": 0, "1": 2, "2": 1, "3": 4}
    fed = prepare_federation(out, read_cfg().data, progress=False)  # every command reads the folder
    cached = [c.case_id for s in fed.sites for split in ("train", "val") for c in fed.site_cases(s, split)]
    assert sorted(cached + [c.case_id for c in fed.test_cases()]) == result.written and not fed.skipped


def read_cfg():
    from mstkd.config import load_config

    return load_config(["model=tiny"])


def test_an_nnunet_dataset_with_region_labels_becomes_fets_case_folders(tmp_path):
    src, out = nnunet(tmp_path / "Dataset137_BraTS21"), tmp_path / "data"
    assert main(["convert", str(src), str(out), "--quiet"]) == 0
    files = detect_case(out / "BraTS2021_00001")
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):  # nnU-Net's BraTS order: T1, T1ce, T2, FLAIR
        source = src / "imagesTr" / f"BraTS2021_00001_{i:04d}.nii.gz"
        assert files.images[modality].read_bytes() == source.read_bytes()  # copied as it is
    assert same_regions(np.asarray(nib.load(files.seg).dataobj), 1)


def test_one_bad_case_costs_itself_and_a_second_call_resumes(tmp_path, capsys):
    src, out = nnunet(tmp_path / "src", cases=3), tmp_path / "data"
    bad = source_labels(1)
    bad[0, 0, 0] = 7  # a value dataset.json does not name
    save(src / "labelsTr" / "BraTS2021_00001.nii.gz", bad)
    (out / ".BraTS2021_00002.abcd1234").mkdir(parents=True)  # what a killed call left
    assert main(["convert", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "BraTS2021_00001" in err and "label values [7] are not in dataset.json" in err
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000", "BraTS2021_00002", "convert.json"]
    save(src / "labelsTr" / "BraTS2021_00001.nii.gz", source_labels(1))
    assert main(["convert", str(src), str(out), "--quiet"]) == 0
    assert json.loads((out / "convert.json").read_text())["cases"] == {
        "written": ["BraTS2021_00001"],
        "kept": ["BraTS2021_00000", "BraTS2021_00002"],
        "failed": {},
    }


def test_test_images_convert_without_labels(tmp_path):
    src = nnunet(tmp_path / "src", cases=1)
    for i in range(4):
        save(src / "imagesTs" / f"BraTS2021_00009_{i:04d}.nii.gz", channel(i, 9))
    result = convert_dataset(src, tmp_path / "test", test=True, progress=False)
    assert result.written == ["BraTS2021_00009"] and detect_case(tmp_path / "test" / "BraTS2021_00009").seg is None
    convert_dataset(src, tmp_path / "train", progress=False)
    with pytest.raises(InputError, match="holds the training cases"):  # unlabelled cases among the training ones
        convert_dataset(src, tmp_path / "train", test=True, progress=False)
    with pytest.raises(InputError, match="holds the test cases"):
        convert_dataset(src, tmp_path / "test", progress=False)


@pytest.mark.parametrize(
    "meta,message",
    [
        ({**NNUNET, "channel_names": {"0": "T1", "1": "DWI"}}, "channel '1' named 'DWI': expected one of"),
        ({**NNUNET, "channel_names": {"0": "T1", "1": "T1w"}}, "two channels are t1"),
        ({**MSD, "labels": {"0": "background", "1": "edema", "2": "tumour"}}, "label 2 named 'tumour' is not"),
        (
            {**MSD, "labels": {"0": "background", "1": "edema", "3": "enhancing"}},
            r"must name background \(0\), necrosis",
        ),
        ({**MSD, "labels": {"0": "background", "1": "edema", "2": "necrosis", "999": "enhancing"}}, "0..255"),
        ({**NNUNET, "labels": {"background": 0, "whole tumor": [1, 2], "tumor core": [2, 3], "enhancing": 3}}, ">="),
        ({**MSD, "labels": {"0": "background", "1": "edema", "2": "necrosis", "²": "enhancing"}}, "0..255"),
        ({**NNUNET, "labels": {"background": 0, "edema": 1, "necrosis": 1, "enhancing": 3}}, "named twice"),
        ({**NNUNET, "labels": {"background": 0, "whole tumor": [], "tumor core": [2, 3], "enhancing": 3}}, "0..255"),
        ({**NNUNET, "channel_names": {"²": "T1"}}, "channel '²'"),
        ({**NNUNET, "channel_names": {"0": "T1", "2": "T2"}}, "numbered 0..1"),
        ({**MSD, "labels": {"0": "background", "1": ["not", "edema"], "2": "necrosis", "3": "enhancing"}}, "label 1"),
        ([1, 2, 3], "not a JSON object"),
    ],
)
def test_a_dataset_json_that_does_not_say_what_its_channels_and_labels_are_is_refused(tmp_path, meta, message):
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=message):
        read_dataset(tmp_path)


def test_file_names_that_are_no_plain_case_id_are_refused(tmp_path):
    src = nnunet(tmp_path / "src", cases=1)
    save(src / "imagesTr" / "-rf_0000.nii.gz", channel(0, 0))
    with pytest.raises(InputError, match="is not a plain case id"):
        convert_dataset(src, tmp_path / "out", progress=False)
    (tmp_path / "big" / "dataset.json").parent.mkdir()
    (tmp_path / "big" / "dataset.json").write_text("{" + " " * (17 << 20) + "}")
    with pytest.raises(InputError, match="larger than 16 MiB"):
        read_dataset(tmp_path / "big")


def test_an_msd_image_without_the_channels_dataset_json_names_costs_its_case(tmp_path):
    src = msd(tmp_path / "src", cases=2)
    save(src / "imagesTr" / "BRATS_001.nii.gz", np.stack([channel(i, 1) for i in range(3)], axis=-1))
    result = convert_dataset(src, tmp_path / "out", progress=False)
    assert result.written == ["BRATS_000"]
    assert "expected a 3-D volume of 4 channels, got shape (20, 18, 14, 3)" in result.failed["BRATS_001"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no half-written case


@pytest.mark.parametrize(
    "labels,expected",
    [
        (  # BraTS 2015's five labels, with necrosis spelled without a hyphen: not enhancing tumour
            {"0": "background", "1": "necrosis", "2": "edema", "3": "nonenhancing tumor", "4": "enhancing tumor"},
            {0: 0, 1: 1, 2: 2, 3: 1, 4: 4},
        ),
        (  # BraTS 2023's names: the edema is a "non-enhancing FLAIR hyperintensity"
            {
                "0": "background",
                "1": "NETC",
                "2": "Surrounding Non-enhancing FLAIR Hyperintensity",
                "3": "GD_Enhancing_Tumor",
            },
            {0: 0, 1: 1, 2: 2, 3: 4},
        ),
        ({"0": "background", "1": "NCR/NET", "2": "peritumoral edema", "4": "ET"}, {0: 0, 1: 1, 2: 2, 4: 4}),
        (  # BraTS 2024's resection cavity is in no tumour region: background, as the project trains it
            {"0": "background", "1": "NETC", "2": "SNFH", "3": "ET", "4": "resection cavity"},
            {0: 0, 1: 1, 2: 2, 3: 4, 4: 0},
        ),
    ],
)
def test_label_names_are_read_for_what_they_say(tmp_path, labels, expected):
    (tmp_path / "dataset.json").write_text(json.dumps({**MSD, "labels": labels}))
    assert read_dataset(tmp_path).labels == expected
    regions = {"background": 0, "WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    (tmp_path / "dataset.json").write_text(json.dumps({**NNUNET, "labels": regions}))
    assert read_dataset(tmp_path).labels == {0: 0, 1: 2, 2: 1, 3: 4}


def test_a_case_every_command_would_refuse_is_not_written(tmp_path):
    src = nnunet(tmp_path / "src", cases=3)
    (src / "imagesTr" / "BraTS2021_00001_0002.nii.gz").unlink()  # a channel short
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    (src / "labelsTr" / "BraTS2021_00002.nii.gz").unlink()
    nib.save(nib.Nifti1Image(source_labels(2), shifted), src / "labelsTr" / "BraTS2021_00002.nii.gz")
    result = convert_dataset(src, tmp_path / "out", progress=False)
    assert result.written == ["BraTS2021_00000"]
    assert "no BraTS2021_00001_0002 image" in result.failed["BraTS2021_00001"]
    assert "not on the grid of BraTS2021_00002_0000.nii.gz" in result.failed["BraTS2021_00002"]
    prepare_federation(tmp_path / "out", read_cfg().data, progress=False)  # the folder reads


def test_a_folder_made_with_other_maps_or_holding_the_dataset_is_refused(tmp_path):
    src, out = nnunet(tmp_path / "src", cases=1), tmp_path / "out"
    convert_dataset(src, out, progress=False)
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "BraTS2021_00000").stat().st_mode & 0o777 == 0o777 & ~mask  # as readable as its files
    (src / "dataset.json").write_text(
        json.dumps({**NNUNET, "channel_names": {"0": "T1ce", "1": "T1", "2": "T2", "3": "Flair"}})
    )
    with pytest.raises(InputError, match="other channel or label maps"):
        convert_dataset(src, out, progress=False)
    with pytest.raises(InputError, match="holds the dataset"):
        convert_dataset(src, tmp_path, progress=False)
    (tmp_path / "mine" / "BraTS2021_00000").mkdir(parents=True)
    with pytest.raises(InputError, match="already holds BraTS2021_00000, not made by mstkd convert"):
        convert_dataset(src, tmp_path / "mine", progress=False)


def test_an_msd_case_id_ending_in_four_digits_is_one_case(tmp_path):
    src = msd(tmp_path / "src", cases=1)
    (src / "imagesTr" / "BRATS_000.nii.gz").rename(src / "imagesTr" / "BRATS_0001.nii.gz")
    (src / "labelsTr" / "BRATS_000.nii.gz").rename(src / "labelsTr" / "BRATS_0001.nii.gz")
    assert convert_dataset(src, tmp_path / "out", progress=False).written == ["BRATS_0001"]


def test_a_one_channel_msd_task_keeps_its_three_axes(tmp_path):
    src = tmp_path / "src"
    save(src / "imagesTr" / "BRATS_000.nii.gz", channel(0, 0))
    save(src / "labelsTr" / "BRATS_000.nii.gz", source_labels(0))
    (src / "dataset.json").write_text(json.dumps({**MSD, "modality": {"0": "FLAIR"}}))
    assert convert_dataset(src, tmp_path / "out", progress=False).written == ["BRATS_000"]
    flair = nib.load(detect_case(tmp_path / "out" / "BRATS_000").images["flair"])
    assert flair.shape == SHAPE and np.array_equal(np.asarray(flair.dataobj), channel(0, 0))


def test_a_file_that_links_outside_the_dataset_is_read_only_with_follow_links(tmp_path, capsys):
    """A dataset from elsewhere could link a scan elsewhere on this machine (another study's patient) into its
    imagesTr/ or labelsTr/, and convert copied it into OUT, which may be shared. Links within the dataset are
    followed; links out of it only with --follow-links (a dataset that links to a shared copy of BraTS), and both
    images and label maps are checked before anything is written."""
    src, elsewhere = nnunet(tmp_path / "src", cases=2), nnunet(tmp_path / "private", cases=2)
    image = src / "imagesTr" / "BraTS2021_00001_0002.nii.gz"
    image.unlink()
    image.symlink_to(elsewhere / "imagesTr" / "BraTS2021_00001_0002.nii.gz")
    inside = src / "imagesTr" / "BraTS2021_00000_0001.nii.gz"
    (src / "kept.nii.gz").write_bytes(inside.read_bytes())
    inside.unlink()
    inside.symlink_to(src / "kept.nii.gz")  # a link within the dataset: read as any file
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{image} (and 0 more) links outside {src}; give --follow-links" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet", "--follow-links"]) == 0
    label = src / "labelsTr" / "BraTS2021_00000.nii.gz"
    label.unlink()
    label.symlink_to(elsewhere / "labelsTr" / "BraTS2021_00000.nii.gz")
    image.unlink()
    image.symlink_to(src / "kept.nii.gz")
    assert main(["convert", str(src), str(tmp_path / "again"), "--quiet"]) == 2  # a label map too, up front
    assert f"{label} (and 0 more) links outside {src}; give --follow-links" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
