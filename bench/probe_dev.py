"""Choose the linear probe's image features (which towers, which input scales) on dev data only.

Dev protocol: only the labelled training split is read (for CIFAR-10, the 10,000-image train subset); the
test split is not touched. Each candidate feature set gets ``cliplab probe``'s own rule (C searched on 20% of
each class, seed 0: "val") and, at that C, a stratified 5-fold cross-validation over all training images
("cv": every image is scored once, so the estimate has about a fifth of the single split's variance when
candidates are compared). Candidates are ranked by the cross-validated accuracy. Features come from the feature
cache, so a rerun after ``cliplab probe`` is quick.

    python bench/probe_dev.py [--data ../shared/data/cifar10] [--flip-train] [FEATURES ...]

FEATURES: the probe's feature spec, comma-separated image towers ``ARCH[@SIZE]`` side by side, as ``cliplab eval
probe --features`` takes it (``lite0,lite2@224``: Lite0 at its own size beside Lite2 at 224 px).

Results: ``bench/results/probe_dev.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

FOUR = "lite0,lite2,lite1,mobilenetv2_100"
CANDIDATES = (  # the four packaged towers at their own input sizes, plus second, smaller scales of some
    FOUR,
    FOUR + ",lite0@192",
    FOUR + ",lite2@224",
    FOUR + ",lite0@192,lite2@224",
    FOUR + ",lite0@192,lite2@224,lite1@208,mobilenetv2_100@192",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="*", help=f"feature specs compared (default: {CANDIDATES})")
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--split", default="train", help="the labelled split to choose on (never the test split)")
    ap.add_argument("--flip-train", action="store_true", help="fit on each image and its mirror (probe --flip-train)")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    if args.split == "test":
        sys.exit("probe_dev: choose on a training split, never on test")

    from cliplab.data.images import MirroredImages
    from cliplab.data.labelled import load_labelled
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import image_tower_features
    from cliplab.eval.probe import cross_validated_accuracy, fit_logistic_probe
    from cliplab.models.factory import feature_stack

    dev = load_labelled(args.data, split=args.split)
    labels = np.asarray(dev.labels)
    cache = FeatureCache()
    rows = []
    for spec in args.specs or CANDIDATES:
        t = time.perf_counter()
        stack = feature_stack(spec.split(","))
        views = [image_tower_features(stack, imgs, cache=cache, desc=f"{spec} {tag}")
                 for imgs, tag in ((dev.images, "images"), (MirroredImages(dev.images), "mirrored"))]
        t_feat = time.perf_counter() - t
        averaged = (views[0] + views[1]) / 2
        train_views = views if args.flip_train else None
        fit = fit_logistic_probe(averaged, labels, power_norm=True, train_views=train_views)
        c = fit.hyperparameters["C"]
        cv = cross_validated_accuracy(averaged, labels, c, folds=args.folds, power_norm=True, train_views=train_views)
        rows.append({"features": spec, "dim": int(averaged.shape[1]), "C": c, "val_accuracy": fit.val_accuracy,
                     "cv_accuracy": float(np.mean(cv)), "cv_folds": cv, "cv_std_error": float(np.std(cv, ddof=1) /
                                                                                              np.sqrt(len(cv))),
                     "feature_seconds": t_feat, "fit_seconds": time.perf_counter() - t - t_feat})
        print(f"{spec}: val {fit.val_accuracy:.2f} cv {np.mean(cv):.2f} (C {c:.4g})", flush=True)
    best = max(rows, key=lambda r: r["cv_accuracy"])
    protocol = (f"{args.data} split {args.split!r} only ({len(labels)} images; test untouched); probe rule: C "
                f"searched on 20% of each class (seed 0), then {args.folds}-fold stratified CV at that C; flip-averaged"
                f" power-normalised features{', fitted on both views' if args.flip_train else ''}; ranked by CV")
    save("probe_dev" + ("_fliptrain" if args.flip_train else ""),
         {"protocol": protocol, "rows": rows, "chosen": best["features"]})
    print(table([(r["features"], r["dim"], f"{r['C']:.4g}", f"{r['val_accuracy']:.2f}", f"{r['cv_accuracy']:.2f}",
                  f"{r['cv_std_error']:.2f}") for r in rows], ("features", "dim", "C", "val acc", "CV acc", "CV s.e.")))
    print(f"\nchosen (highest CV accuracy): {best['features']}\nprotocol: {protocol}")


if __name__ == "__main__":
    main()
