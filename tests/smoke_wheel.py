"""Smoke test of an installed cliplab wheel (not the source tree): run by `make wheel-test` with the python
of a fresh virtual environment that holds the core install only (no extras).

Checks: ``cliplab --version`` equals the package metadata, ``cliplab demo --help`` and ``cliplab configs``
work, packaged configs and data load, a tiny train + eval on synthetic images runs end to end, and a
feature whose extra is missing (figures) fails with one line naming the extra.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from cliplab import rundir

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}


def run_cliplab(*args: str, cwd: Path, expect: int = 0) -> str:
    exe = Path(sys.executable).with_name("cliplab")
    res = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "CLIPLAB_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"})
    if res.returncode != expect:
        raise SystemExit(f"cliplab {' '.join(args)} exited {res.returncode} (expected {expect}):\n"
                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def synthetic_pairs(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows, i = [], 0
    for c, (colour, rgb) in enumerate(COLOURS.items()):
        for shape in ("circle", "square"):
            for rep in range(2):
                im = Image.new("RGB", (64, 64), (235, 235, 235))
                draw = ImageDraw.Draw(im)
                (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=rgb)
                name = f"images/img{i:02d}.jpg"
                im.save(root / name)
                split = "train" if rep == 0 else ("dev" if c % 2 == 0 else "test")
                rows += [(name, f"a {colour} {shape}", split), (name, f"a picture of a {colour} {shape}", split)]
                i += 1
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows(rows)
    return root / "pairs.csv"


def main() -> None:
    import cliplab

    here = Path(cliplab.__file__).resolve()
    assert "site-packages" in str(here), f"cliplab imported from {here}, not from the installed wheel"
    version = metadata.version("cliplab")
    assert cliplab.__version__ == version, (cliplab.__version__, version)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assert run_cliplab("--version", cwd=tmp).strip().startswith(f"cliplab {version}")
        assert "Flickr8k end to end" in run_cliplab("demo", "--help", cwd=tmp)
        assert "flickr8k_heads" in run_cliplab("configs", cwd=tmp)
        from cliplab.assets import imagenet_classnames
        from cliplab.train.config import RunConfig

        assert len(imagenet_classnames()) == 1000
        assert RunConfig.load("flickr8k_heads").train.sampling == "all_pairs"  # a packaged config by name
        data = synthetic_pairs(tmp / "data")
        run = tmp / "run"
        run_cliplab("train", str(data), "-c", "flickr8k_heads", "--run-dir", str(run), "-s", "train.epochs=2",
                "-s", "train.batch_size=4", "-s", "model.head.embed_dim=16", "-s", "data.backend=torch", cwd=tmp)
        results = json.loads((run / rundir.RESULTS).read_text())
        assert set(results["test"]) == {"conse", "trained"} and results["provenance"]["cliplab"] == version
        out = run_cliplab("eval", "retrieval", str(data), "-m", str(run), "--run-dir", str(tmp / "eval"), cwd=tmp)
        metrics = json.loads((tmp / "eval" / rundir.EVAL_METRICS).read_text())
        assert np.isclose(metrics[str(run)]["t2i_mrr"], results["test"]["trained"]["t2i_mrr"]), out
        # a feature of an extra that is not installed: one line naming the extra
        err = run_cliplab("eval", "retrieval", str(data), "-m", "conse", "--plots", "--run-dir", str(tmp / "e2"),
                      cwd=tmp, expect=2)
        assert err.count("\n") == 1 and 'pip install "cliplab[viz]"' in err, err
    print(f"wheel smoke test passed: cliplab {version} from {here.parent}")


if __name__ == "__main__":
    main()
