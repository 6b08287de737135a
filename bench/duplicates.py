"""Near-duplicate threshold on a planted set: how well does `cliplab duplicates` find edited copies?

    python bench/duplicates.py [-m conse] [--data ../shared/data/flickr8k] [--planted 200]

Protocol (``duplicates.precision`` / ``duplicates.recall``): a split's images plus, for the first ``--planted``
of them (sorted by name), five edited copies each — JPEG quality 30, resized to 50%, a centred 90% crop, rotated
by 4 degrees, a colour shift (saturation x1.4, brightness x1.1). An original and its copies form one family;
every other pair is a negative (Flickr8k's own near-identical shots, if any, count against precision). Groups
come from :func:`cliplab.serve.duplicates.near_groups` (the function `cliplab duplicates` runs), scored over
pairs. The threshold with the highest F1 on **dev** is the default; precision and recall at it are then measured
once on the same construction over **test**; the script says whether the library's ``NEAR_THRESHOLD`` is it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_and_data_args, save, table  # noqa: E402

THRESHOLDS = tuple(round(t, 3) for t in np.arange(0.80, 0.995, 0.01))


def edits(im: Image.Image) -> dict[str, tuple[Image.Image, int]]:
    """The five planted copies of an image and the JPEG quality each is saved with."""
    w, h = im.size
    crop = im.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    colour = ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.4)).enhance(1.1)
    return {"jpeg30": (im, 30), "half": (im.resize((w // 2, h // 2), Image.BICUBIC), 90), "crop90": (crop, 90),
            "rot4": (im.rotate(4, resample=Image.BICUBIC), 90), "colour": (colour, 90)}


def planted_split(data: Path, split: str, planted: int, folder: Path) -> tuple[list[str], list[list[int]]]:
    """Image files of a split plus edited copies of its first ``planted`` images, and the families (rows)."""
    from cliplab.data.captions import load_caption_dataset

    dataset = load_caption_dataset(data, split)
    originals = sorted(str(p) for p in dataset.image_paths())
    files, families = list(originals), []
    for row, path in enumerate(originals[:planted]):
        family = [row]
        with Image.open(path) as im:
            im = im.convert("RGB")
            for name, (copy, quality) in edits(im).items():
                out = folder / f"{split}-{row:04d}-{name}.jpg"
                copy.save(out, quality=quality)
                family.append(len(files))
                files.append(str(out))
        families.append(family)
    return files, families


def embeddings(model, files: list[str]) -> np.ndarray:
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import image_embeddings

    vectors, valid, errors = image_embeddings(model, files, cache=FeatureCache())
    if not valid.all():
        raise SystemExit(f"unreadable images: {errors}")
    return vectors


def main() -> None:
    import cliplab
    from cliplab.serve.duplicates import NEAR_THRESHOLD, near_groups, pair_scores

    args = model_and_data_args(__doc__, planted=200)
    model = cliplab.load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="cliplab-dups-") as tmp:
        dev_files, dev_families = planted_split(args.data, "dev", args.planted, Path(tmp))
        dev = embeddings(model, dev_files)
        grid = {t: pair_scores(near_groups(dev, t), dev_families) for t in THRESHOLDS}
        print(f"dev: {len(dev_files)} images ({args.planted} originals with 5 copies each)")
        print(table([(t, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["predicted_pairs"])
                     for t, m in grid.items()], ("threshold", "precision", "recall", "F1", "predicted pairs")))
        chosen = max(grid, key=lambda t: (round(grid[t]["f1"], 9), t))
        test_files, test_families = planted_split(args.data, "test", args.planted, Path(tmp))
        test = pair_scores(near_groups(embeddings(model, test_files), chosen), test_families)
    print(f"chosen on dev: threshold {chosen} (library NEAR_THRESHOLD {NEAR_THRESHOLD}: "
          f"{'the same' if chosen == NEAR_THRESHOLD else 'DIFFERENT - update it'})")
    print(f"test ({len(test_files)} images, scored once at {chosen}): precision {test['precision']:.3f}, "
          f"recall {test['recall']:.3f}, F1 {test['f1']:.3f} ({test['predicted_pairs']} predicted pairs, "
          f"{test['true_pairs']} planted)")
    save("duplicates" if args.model == "conse" else f"duplicates_{Path(args.model).name}",
         {"model": args.model, "planted": args.planted, "chosen_on_dev": chosen, "library_threshold": NEAR_THRESHOLD,
          "dev_grid": [{"threshold": t, **m} for t, m in grid.items()], "test": test, "machine": machine()})


if __name__ == "__main__":
    main()
