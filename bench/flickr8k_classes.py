"""A second labelled image set for zero-shot checks, derived from Flickr8k's captions.

An image gets class K when at least 3 of its 5 captions name K (by the keywords below) and no caption
names another class; images matching no class or several are left out. The ``train`` split holds the
Flickr8k training images (the unlabelled pool for ``--self-train``), ``test`` the Flickr8k dev and test
images. The labels are caption-derived, so some are wrong; the classes are unbalanced (dogs dominate):
read macro-F1 beside accuracy.

    python bench/flickr8k_classes.py [--data ../shared/data/flickr8k] [--out runs/flickr8k-classes]

Writes ``OUT/flickr8k_classes.csv`` (``image,label,split``, absolute image paths) and prints the class counts.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

CLASSES = {
    "dog": r"\b(dog|dogs|puppy|puppies)\b",
    "horse": r"\b(horse|horses|pony)\b",
    "bicycle": r"\b(bike|bikes|bicycle|bicycles|bicyclist|cyclist|biker)\b",
    "boat": r"\b(boat|boats|canoe|kayak|sailboat|raft)\b",
    "car": r"\b(car|cars|truck)\b",
    "bird": r"\b(bird|birds|seagull|duck|ducks)\b",
    "skier": r"\b(ski|skier|skiers|skiing|snowboard|snowboarder|snowboarding)\b",
    "surfer": r"\b(surf|surfer|surfers|surfing|surfboard)\b",
    "skateboarder": r"\b(skateboard|skateboarder|skateboarding|skater)\b",
    "motorcycle": r"\b(motorcycle|motorbike|dirt bike|motorcyclist)\b",
    "football player": r"\bfootball\b",
    "basketball player": r"\bbasketball\b",
    "soccer player": r"\bsoccer\b",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--out", default="runs/flickr8k-classes")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    captions: dict[str, list[str]] = defaultdict(list)
    with open(data / "captions.txt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            captions[row["image"]].append(row["caption"].lower())
    split_of = {}
    for split, name in (("train", "Flickr_8k.trainImages.txt"), ("test", "Flickr_8k.devImages.txt"),
                        ("test", "Flickr_8k.testImages.txt")):
        split_of.update({line.strip(): split for line in open(data / name) if line.strip()})
    patterns = {k: re.compile(p) for k, p in CLASSES.items()}
    rows, counts = [], Counter()
    for image, caps in sorted(captions.items()):
        if image not in split_of:
            continue
        hits = {k: sum(bool(p.search(c)) for c in caps) for k, p in patterns.items()}
        named = [k for k, v in hits.items() if v]
        if len(named) == 1 and hits[named[0]] >= 3:
            rows.append((str(data / "images" / image), named[0], split_of[image]))
            counts[(named[0], split_of[image])] += 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "flickr8k_classes.csv"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split"])
        w.writerows(rows)
    tmp.replace(path)
    for k in CLASSES:
        print(f"{k}: train {counts[(k, 'train')]}, test {counts[(k, 'test')]}")
    print(f"wrote {path}: {len(rows)} images")


if __name__ == "__main__":
    main()
