"""The GTSRB reader on a generated tree, on torchvision's layout, and on every kind of broken tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtrain.contract.errors import BadDataError
from fedtrain.worker.data.gtsrb import load_tree, sign_names, split_by_track
from fedtrain.worker.data.images import load_samples


def test_reads_the_official_layout(synth_tree: Path) -> None:
    tree = load_tree(synth_tree)
    assert tree.layout == "official"
    assert len(tree.train) == 43 * 8 and len(tree.test) == 43 * 2
    assert {s.class_id for s in tree.train} == set(range(43))
    first = tree.train[0]
    assert first.sample_id == "Final_Training/Images/00000/00000_00000.ppm"
    assert first.track == "00000/00000" and first.roi is not None
    images, labels = load_samples(tree, tree.train[:5], image_size=24, roi_crop=True)
    assert images.shape == (5, 24, 24, 3) and labels.tolist() == [0] * 5
    assert sign_names(synth_tree)[14] == "Stop"


def make_torchvision_layout(official: Path, target: Path) -> Path:
    """torchvision.datasets.GTSRB: GTSRB/Training/000NN (no CSVs), GTSRB/Final_Test/Images, GT-final_test.csv."""
    shutil.copytree(official / "Final_Training" / "Images", target / "GTSRB" / "Training",
                    ignore=shutil.ignore_patterns("*.csv"))
    shutil.copytree(official / "Final_Test" / "Images", target / "GTSRB" / "Final_Test" / "Images",
                    ignore=shutil.ignore_patterns("*.csv"))
    shutil.copy(official / "Final_Test" / "Images" / "GT-final_test.csv", target / "GT-final_test.csv")
    return target


def test_reads_torchvision_layout(synth_tree: Path, tmp_path: Path) -> None:
    tree = load_tree(make_torchvision_layout(synth_tree, tmp_path))
    assert tree.layout == "torchvision"
    assert len(tree.train) == 43 * 8 and len(tree.test) == 43 * 2
    assert all(s.roi is None for s in tree.train)  # no CSVs: whole images
    assert tree.train[-1].class_id == 42


def test_split_by_track_never_splits_a_track(synth_tree: Path) -> None:
    tree = load_tree(synth_tree)
    train, validation = split_by_track(tree.train, 0.3, seed=5)
    assert {s.track for s in train}.isdisjoint({s.track for s in validation})
    assert len(train) + len(validation) == len(tree.train)
    assert {s.class_id for s in validation} == set(range(43))  # two tracks per class: one held out each
    assert split_by_track(tree.train, 0.3, seed=5) == (train, validation)


@pytest.fixture
def broken(synth_tree: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(synth_tree, copy)
    return copy


def test_missing_class_csv_is_named(broken: Path) -> None:
    (broken / "Final_Training/Images/00007/GT-00007.csv").unlink()
    with pytest.raises(BadDataError, match=r"GT-00007.csv: missing"):
        load_tree(broken)


def test_unreadable_image_is_named(broken: Path) -> None:
    image = broken / "Final_Training/Images/00003/00000_00001.ppm"
    image.write_bytes(b"not an image")
    tree = load_tree(broken)
    sample = next(s for s in tree.train if s.sample_id.endswith("00003/00000_00001.ppm"))
    with pytest.raises(BadDataError, match=r"00000_00001.ppm: unreadable image"):
        load_samples(tree, [sample], 16, True)


def test_listed_but_absent_image_is_named(broken: Path) -> None:
    (broken / "Final_Training/Images/00004/00001_00000.ppm").unlink()
    with pytest.raises(BadDataError, match=r"GT-00004.csv: lists 00001_00000.ppm, but .* does not exist"):
        load_tree(broken)


def test_class_folder_out_of_range_is_named(broken: Path) -> None:
    shutil.copytree(broken / "Final_Training/Images/00001", broken / "Final_Training/Images/00043")
    with pytest.raises(BadDataError, match=r"00043: class folder 00043 is out of range 00000..00042"):
        load_tree(broken)


def test_badly_named_class_folder(broken: Path) -> None:
    (broken / "Final_Training/Images/stop").mkdir()
    with pytest.raises(BadDataError, match="five digits"):
        load_tree(broken)


def test_test_csv_without_class_id_is_named(broken: Path) -> None:
    csv = broken / "Final_Test/Images/GT-final_test.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(";".join(line.split(";")[:-1]) for line in lines) + "\n")
    with pytest.raises(BadDataError, match=r"GT-final_test.csv: no 'ClassId' column"):
        load_tree(broken)


def test_missing_test_labels_are_named(broken: Path) -> None:
    (broken / "Final_Test/Images/GT-final_test.csv").unlink()
    with pytest.raises(BadDataError, match=r"test labels missing: expected .*GT-final_test.csv"):
        load_tree(broken)
    assert len(load_tree(broken, need_test=False).train) == 43 * 8


def test_not_a_tree(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="not a GTSRB tree"):
        load_tree(tmp_path)
    with pytest.raises(BadDataError, match="does not exist"):
        load_tree(tmp_path / "nowhere")
