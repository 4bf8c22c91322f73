"""Reading GTSRB from disk, in the official layout or in torchvision's.

Official (as distributed by the benchmark's authors)::

    <root>/Final_Training/Images/000NN/TTTTT_FFFFF.ppm + GT-000NN.csv
    <root>/Final_Test/Images/NNNNN.ppm + GT-final_test.csv   (the CSV may also sit in <root>)
    <root>/signnames.csv                                      (optional)

torchvision (``torchvision.datasets.GTSRB``)::

    <root>/GTSRB/Training/000NN/*.ppm [+ GT-000NN.csv]
    <root>/GTSRB/Final_Test/Images/*.ppm + <root>/GT-final_test.csv

The CSVs are ``;``-separated with ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``.
Every frame of one physical sign shares the track number ``TTTTT``; splitting by frame would put
near-identical images on both sides of a train/validation split, so splits here go by track.
"""

from __future__ import annotations

import csv
import importlib.resources
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtrain.contract.errors import BadDataError

NUM_CLASSES = 43
CSV_DELIMITER = ";"
ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")


@dataclass(frozen=True)
class Sample:
    """One labelled image: ``sample_id`` is its path relative to the data set root (stable across machines)."""

    sample_id: str
    class_id: int
    track: str
    roi: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class GtsrbTree:
    """A located data set: its root and the two splits."""

    root: Path
    layout: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    def path_of(self, sample: Sample) -> Path:
        """Absolute path of a sample's image file."""
        return self.root / sample.sample_id


def sign_names(root: Path | None = None) -> list[str]:
    """Human names of the 43 classes: the tree's own ``signnames.csv`` if it has one, else the shipped one."""
    own = root / "signnames.csv" if root is not None else None
    if own is not None and own.is_file():
        text = own.read_text(encoding="utf-8")
        source = str(own)
    else:
        text = importlib.resources.files("fedtrain.worker.data").joinpath("signnames.csv").read_text("utf-8")
        source = "the shipped signnames.csv"
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "ClassId" not in rows[0] or "SignName" not in rows[0]:
        raise BadDataError(f"{source}: expected a header 'ClassId,SignName'")
    return [row["SignName"] for row in sorted(rows, key=lambda r: int(r["ClassId"]))]


def load_tree(root: Path, num_classes: int = NUM_CLASSES, need_test: bool = True) -> GtsrbTree:
    """Locate and index a GTSRB tree in either layout; fail naming the file and what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise BadDataError(f"{root}: data set directory does not exist (expected a GTSRB tree here)")
    if (root / "Final_Training" / "Images").is_dir():
        train_dir, layout = root / "Final_Training" / "Images", "official"
        test_dir = root / "Final_Test" / "Images"
        test_csv_candidates = [test_dir / "GT-final_test.csv", root / "GT-final_test.csv"]
    elif (root / "GTSRB" / "Training").is_dir():
        train_dir, layout = root / "GTSRB" / "Training", "torchvision"
        test_dir = root / "GTSRB" / "Final_Test" / "Images"
        test_csv_candidates = [root / "GT-final_test.csv", test_dir / "GT-final_test.csv"]
    else:
        raise BadDataError(
            f"{root}: not a GTSRB tree: expected 'Final_Training/Images/000NN' (official layout) "
            "or 'GTSRB/Training/000NN' (torchvision layout)"
        )
    train = tuple(_read_training(root, train_dir, num_classes, require_csv=layout == "official"))
    if not train:
        raise BadDataError(f"{train_dir}: no training images found (expected class folders 00000..000NN)")
    test: tuple[Sample, ...] = ()
    if need_test:
        test = tuple(_read_test(root, test_dir, test_csv_candidates, num_classes))
    return GtsrbTree(root=root, layout=layout, train=train, test=test)


def _read_training(root: Path, train_dir: Path, num_classes: int, require_csv: bool) -> Iterable[Sample]:
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        class_id = _class_of_folder(class_dir, num_classes)
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        if csv_path.is_file():
            for row in _read_csv(csv_path):
                if "ClassId" in row and int(row["ClassId"]) != class_id:
                    raise BadDataError(
                        f"{csv_path}: row for {row['Filename']} has ClassId {row['ClassId']}, "
                        f"but it lies in class folder {class_dir.name}"
                    )
                yield _sample(root, class_dir / row["Filename"], class_id, row, csv_path)
        elif require_csv:
            raise BadDataError(f"{csv_path}: missing (the official layout has one GT CSV per class folder)")
        else:
            for image in sorted(class_dir.glob("*.ppm")):
                yield _sample(root, image, class_id, None, class_dir)


def _read_test(root: Path, test_dir: Path, candidates: Sequence[Path], num_classes: int) -> Iterable[Sample]:
    csv_path = next((c for c in candidates if c.is_file()), None)
    if csv_path is None:
        names = " or ".join(str(c) for c in candidates)
        raise BadDataError(f"test labels missing: expected {names} (the GTSRB test ground truth)")
    for row in _read_csv(csv_path, require_class=True):
        class_id = int(row["ClassId"])
        if not 0 <= class_id < num_classes:
            raise BadDataError(f"{csv_path}: ClassId {class_id} is outside 0..{num_classes - 1}")
        yield _sample(root, test_dir / row["Filename"], class_id, row, csv_path)


def _class_of_folder(class_dir: Path, num_classes: int) -> int:
    name = class_dir.name
    if not (name.isdigit() and len(name) == 5):
        raise BadDataError(f"{class_dir}: class folders must be named with five digits, like 00042")
    class_id = int(name)
    if class_id >= num_classes:
        raise BadDataError(f"{class_dir}: class folder {name} is out of range 00000..{num_classes - 1:05d}")
    return class_id


def _read_csv(path: Path, require_class: bool = False) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=CSV_DELIMITER)
        header = reader.fieldnames or []
        if "Filename" not in header:
            raise BadDataError(f"{path}: no 'Filename' column (expected a ';'-separated GTSRB GT file)")
        if require_class and "ClassId" not in header:
            raise BadDataError(
                f"{path}: no 'ClassId' column; the official 'GT-final_test.test.csv' has no labels, "
                "use the separately published 'GT-final_test.csv'"
            )
        return list(reader)


def _sample(root: Path, image: Path, class_id: int, row: dict[str, str] | None, source: Path) -> Sample:
    if not image.is_file():
        raise BadDataError(f"{source}: lists {image.name}, but {image} does not exist")
    roi = None
    if row is not None and all(row.get(c) not in (None, "") for c in ROI_COLUMNS):
        roi = (int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]), int(row["Roi.Y2"]))
    track = image.stem.split("_")[0] if "_" in image.stem else image.stem
    return Sample(image.relative_to(root).as_posix(), class_id, f"{class_id:05d}/{track}", roi)


def split_by_track(
    samples: Sequence[Sample], validation_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split into train and validation so that every track lands wholly on one side.

    Per class, a seeded share of tracks goes to validation (at least one track when the class has
    two or more), so that every class with enough tracks is seen on both sides.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    tracks_by_class: dict[int, list[str]] = {}
    for sample in samples:
        tracks = tracks_by_class.setdefault(sample.class_id, [])
        if sample.track not in tracks:
            tracks.append(sample.track)
    rng = random.Random(seed)
    held_out: set[str] = set()
    for class_id in sorted(tracks_by_class):
        tracks = sorted(tracks_by_class[class_id])
        rng.shuffle(tracks)
        count = round(len(tracks) * validation_fraction)
        if validation_fraction > 0 and len(tracks) >= 2:
            count = max(1, min(count, len(tracks) - 1))
        held_out.update(tracks[:count])
    train = [s for s in samples if s.track not in held_out]
    validation = [s for s in samples if s.track in held_out]
    return train, validation
