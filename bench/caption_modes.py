"""Every captioning tuning mode on the same budget: train (or resume) each mode of the packaged
``flickr8k_caption`` config on the first N training images for E epochs, evaluate the dev-selected
checkpoint once on the Flickr8k test split, and tabulate trainable parameters, time and all metrics.

    python bench/caption_modes.py [--images 1000] [--epochs 2] [--beam 1] [--features F.npz] [--runs runs/caption-modes]

Runs already trained/evaluated under ``--runs`` are reused (a run with other settings is refused by the
resume check); results: ``bench/results/caption_modes.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

MODES = ("prefix", "lora", "adapter", "full")
METRICS = (("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"),
           ("cider", "CIDEr-D"), ("clipscore", "CLIPScore*"))


def cliplab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cliplab", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--features", default=None, help="a `cliplab caption features` bundle (else from the images)")
    ap.add_argument("--runs", type=Path, default=Path("runs/caption-modes"))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = ap.parse_args()
    rows, out = [], {}
    for mode in a.modes:
        run = a.runs / mode
        if not (run / "captions.json").is_file():
            overrides = [f"model.tuning={mode}", f"train.max_train_images={a.images}", f"train.epochs={a.epochs}",
                         "train.warmup_steps=20", "train.dev_images=50", "train.patience=0"]
            if a.features:
                overrides.append(f"data.features={a.features}")
            cliplab("caption", "train", "-c", "flickr8k_caption", "--run-dir", str(run), "--no-eval",
                    *[x for o in overrides for x in ("-s", o)])
            cliplab("caption", "eval", str(run), "--beam", str(a.beam))
        res = json.loads((run / "captions.json").read_text())
        fit = res["fit"]
        out[mode] = {"parameters": fit["parameters"], "train_minutes": fit["seconds"]["train"] / 60,
                     "best_epoch": fit["best_epoch"], "beam": res["beam"], "decode_seconds": res["seconds"]["decode"],
                     "test": res["model"], "nearest_neighbour": res["nearest_neighbour"]}
        rows.append((mode, f"{fit['parameters']['trainable']:,}", f"{fit['seconds']['train'] / 60:.1f}",
                     *(f"{res['model'][k]:.2f}" if res["model"].get(k) is not None else "n/a" for k, _ in METRICS)))
    nn = next(iter(out.values()))["nearest_neighbour"] if out else {}
    rows.append(("nearest-neighbour baseline", "0", "—",
                 *(f"{nn[k]:.2f}" if nn.get(k) is not None else "n/a" for k, _ in METRICS)))
    save("caption_modes", {"images": a.images, "epochs": a.epochs, "beam": a.beam, "modes": out,
                           "protocol": "same first N training images, epochs and seed for every mode; checkpoint "
                                       "chosen on 50 dev images (greedy CIDEr-D); Flickr8k test (1,000 images, "
                                       "5 references, PTB tokenizer) evaluated once"})
    print(table(rows, ("mode", "trainable parameters", "train min", *(h for _, h in METRICS))))


if __name__ == "__main__":
    main()
