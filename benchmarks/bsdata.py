"""BSData (ball-screw drive pitting; Schlagenhauf et al., CC BY-SA 4.0) as a qrs folder dataset.

The public repository 2Obe/BSData holds 1,104 photographs of ball-screw drive spindles (mostly
1130 x 460 px), 394 of them with LabelMe polygons of tiny pits, and ``image_data.json``, which names
the wear-development sequences: 14 positions on one spindle type, each photographed 69 times over
weeks as its pitting grows (two overlapping sequence names per position), and 69 images of another
spindle type, every one of them labelled. This script writes, from a checkout of that repository:

  OUT/good/<name>.jpg       the 710 frames without a label file (taken as good, see below)
  OUT/defect/<name>.jpg     the 394 labelled frames
  OUT/masks/<stem>.png      0/255 masks, the polygons rasterised at the image's size
  OUT/split.csv             source,split: whole positions (and whole spindles of the other type) go
                            to one split, so near-identical frames of a sequence never straddle
                            train, val and test
  OUT/groups.csv            source,group,order,suspect: the position or spindle of each image, its
                            frame's place in time, and whether it is a suspect good frame
  OUT/LICENSE, OUT/SOURCE   the data's licence and where it came from

Label noise: pits grow and do not heal, so an unlabelled frame taken after the first labelled frame
of its position most likely shows pitting nobody outlined. Those frames are still written as good
(the data set's own labels), flagged ``suspect`` in groups.csv, and counted in the summary; a
model that finds their pits is scored as a false alarm.

Usage:
  git clone <the fetched snapshot of 2Obe/BSData> BSData
  python benchmarks/bsdata.py --src BSData --out data/bsdata-raw
  qrs prepare --format folder --src data/bsdata-raw --split-file data/bsdata-raw/split.csv \\
      --img-size 224 544 --out data/bsdata
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLIT_SHARES = {"test": 0.25, "val": 0.2}
"""Share of the positions (and of the other type's spindles) held out for test and for validation."""


def rasterize_labelme(label: dict, size: tuple[int, int]) -> np.ndarray:
    """The polygons (and rectangles) of a LabelMe file as an H x W uint8 mask, 255 inside."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in label["shapes"]:
        points = [tuple(p) for p in shape["points"]]
        if shape.get("shape_type") == "rectangle":
            draw.rectangle(points, fill=255)
        elif len(points) >= 3:
            draw.polygon(points, fill=255)
    return np.asarray(mask)


def frame_time(name: str) -> str:
    """The yymmddhhmmss stamp of a sequence frame (``01_<stamp>_<position>_<angle>_crop_<k>.jpg``)."""
    return name.split("_")[1]


def groups(images: list[dict]) -> dict[str, str]:
    """File name -> group: the sequences an image shares are joined (one position), and an image of the
    other type without a sequence is grouped by its spindle (the name before ``_crop``)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for image in images:
        for other in image["wear_dev"][1:]:
            parent[find(other)] = find(image["wear_dev"][0])
    return {image["filename"]: find(image["wear_dev"][0]) if image["wear_dev"]
            else image["filename"].split("_crop")[0] for image in images}


def assign_splits(group_of: dict[str, str], labelled: set[str], seed: int) -> dict[str, str]:
    """Group -> split: positions with and without labels, and the other type's spindles, are each shuffled
    (seeded) and dealt to test, val and train by SPLIT_SHARES, so each split gets some of every kind."""
    members: dict[str, list[str]] = defaultdict(list)
    for name, group in group_of.items():
        members[group].append(name)
    kinds: dict[str, list[str]] = defaultdict(list)
    for group, names in sorted(members.items()):
        sequence = any(n.startswith("01_") for n in names)
        kinds["position" if sequence and labelled & set(names) else "clean position" if sequence else "spindle"].append(group)
    rng = random.Random(seed)
    split: dict[str, str] = {}
    for kind in sorted(kinds):
        pool = kinds[kind]
        rng.shuffle(pool)
        n_test = round(SPLIT_SHARES["test"] * len(pool))
        n_val = round(SPLIT_SHARES["val"] * len(pool))
        for k, group in enumerate(pool):
            split[group] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return split


def convert(src: Path, out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write the folder dataset (see the module doc) and return counts per split: good, defective, suspect."""
    meta_file = src / "image_data.json"
    if not meta_file.is_file():
        raise SystemExit(f"{src} is not a checkout of 2Obe/BSData: image_data.json is missing")
    images = json.loads(meta_file.read_text())["images"]
    labelled = {i["filename"] for i in images if i["annotations"]}
    group_of = groups(images)
    split_of = assign_splits(group_of, labelled, seed)
    first_label: dict[str, str] = {}
    for image in images:
        if image["filename"] in labelled and image["wear_dev"]:
            group = group_of[image["filename"]]
            first_label[group] = min(first_label.get(group, "99"), frame_time(image["filename"]))
    if out.exists():
        shutil.rmtree(out)
    for folder in ("good", "defect", "masks"):
        (out / folder).mkdir(parents=True)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"good": 0, "defective": 0, "suspect good": 0})
    split_rows, group_rows = [], []
    for image in sorted(images, key=lambda i: i["filename"]):
        name = image["filename"]
        group = group_of[name]
        defective = name in labelled
        source = f"{'defect' if defective else 'good'}/{name}"
        shutil.copyfile(src / "data" / name, out / source)
        if defective:
            label = json.loads((src / "label" / image["annotations"]).read_text())
            with Image.open(src / "data" / name) as img:
                mask = rasterize_labelme(label, img.size)
            Image.fromarray(mask).save(out / "masks" / f"{Path(name).stem}.png")
        order = frame_time(name) if image["wear_dev"] else ""
        suspect = not defective and group in first_label and order > first_label[group]
        split = split_of[group]
        counts[split]["defective" if defective else "good"] += 1
        counts[split]["suspect good"] += int(suspect)
        split_rows.append((source, split))
        group_rows.append((source, group, order, int(suspect)))
    with open(out / "split.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("source", "split"), *split_rows])
    with open(out / "groups.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("source", "group", "order", "suspect"), *group_rows])
    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    (out / "SOURCE").write_text("BSData, https://github.com/2Obe/BSData (CC BY-SA 4.0), converted by "
                                "benchmarks/bsdata.py of qrs\n")
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="a checkout of 2Obe/BSData")
    parser.add_argument("--out", required=True, type=Path, help="the folder dataset to write (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the assignment of positions to splits")
    args = parser.parse_args()
    counts = convert(args.src, args.out, args.seed)
    for split in ("train", "val", "test"):
        c = counts.get(split, {})
        print(f"{split}: {c.get('good', 0)} good ({c.get('suspect good', 0)} suspect), {c.get('defective', 0)} defective")
    print(f"wrote {args.out}; prepare it with: qrs prepare --format folder --src {args.out} --split-file "
          f"{args.out / 'split.csv'} --out DATA")


if __name__ == "__main__":
    main()
