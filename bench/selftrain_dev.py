"""Choose the self-training settings of ``cliplab zeroshot --self-train`` on dev data only.

Dev protocol: the labelled CIFAR-10 train subset is split in two random halves (seed 0); self-training
adapts on half A from the zero-shot model's probabilities (A's labels never read) and is scored on half B
(B's labels read only to compare settings). The test split is not touched. Features and zero-shot
embeddings come from the feature cache, so a rerun after ``cliplab zeroshot`` is quick.

    python bench/selftrain_dev.py [--data ../shared/data/cifar10] [-m MODEL] [--features-model SPEC]

Results: ``bench/results/selftrain_dev.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

FRACTION_SETS = ((1.0,), (0.1,), (0.3,), (0.2, 0.4, 0.6), (0.3, 0.6, 0.9), (0.1, 0.3, 0.5, 0.7, 0.9))
C_VALUES = (0.002, 0.02)
TOWERS = "ensemble:conse+conse:efficientnet_lite2+conse:efficientnet_lite1+conse:mobilenetv2_100"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("-m", "--model", default="runs/cifar10-zeroshot-ensemble-towers")
    ap.add_argument("--features-model", default=TOWERS)
    ap.add_argument("--variant", default="clip80")
    args = ap.parse_args()

    from cliplab.data.labelled import load_labelled
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import encode_images, image_tower_features
    from cliplab.eval.self_training import SelfTrainingConfig, self_train
    from cliplab.eval.zeroshot import ZeroShotClassifier
    from cliplab.models.factory import load_model
    from cliplab.models.wrappers import with_flip_tta

    dev = load_labelled(args.data, split="train")
    cache = FeatureCache()
    model = load_model(args.model)
    probs = ZeroShotClassifier(model, dev.class_names, args.variant).predict_proba(
        encode_images(model, dev.images, cache=cache, progress=False)).cpu().numpy()
    feats = image_tower_features(with_flip_tta(load_model(args.features_model), True), dev.images, cache=cache,
                                 progress=False)
    labels = np.asarray(dev.labels)
    perm = np.random.default_rng(0).permutation(len(labels))
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    zeroshot_b = float((probs[half_b].argmax(1) == labels[half_b]).mean() * 100)
    rows = []
    for fractions in FRACTION_SETS:
        for c in C_VALUES:
            t = time.perf_counter()
            fitted = self_train(feats[half_a], probs[half_a], SelfTrainingConfig(fractions=fractions, c=c))
            acc = float((fitted.predict(feats[half_b]) == labels[half_b]).mean() * 100)
            rows.append({"fractions": list(fractions), "c": c, "dev_b_accuracy": acc,
                         "seconds": time.perf_counter() - t})
            print(f"fractions {fractions} C {c}: dev-B accuracy {acc:.2f}", flush=True)
    best = max(rows, key=lambda r: r["dev_b_accuracy"])
    print(table([(",".join(f"{f:g}" for f in r["fractions"]), r["c"], f"{r['dev_b_accuracy']:.2f}",
                  f"{r['seconds']:.1f}") for r in rows], ("fractions", "C", "dev-B accuracy", "seconds")))
    print(f"plain zero-shot on dev B: {zeroshot_b:.2f}; best: {best}")
    save("selftrain_dev", {"data": args.data, "model": args.model, "features_model": args.features_model,
                           "variant": args.variant, "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
                           "zeroshot_dev_b_accuracy": zeroshot_b, "rows": rows, "best": best})


if __name__ == "__main__":
    main()
