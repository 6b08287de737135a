"""Captioning runs on the GPU machine (see BENCHMARKS.md): train each tuning mode from a features bundle and the
packaged GGUF decoder brought over in parts, decode the test split, and pack the small outputs.

    python bench/gpu_caption.py stage  PART...            # copy carried parts into /tmp/cliplab-gpu
    python bench/gpu_caption.py run    MODE[:EPOCHS] ...   # join parts, train + decode each mode, pack $OUT

Scoring with the official PTB tokenizer, METEOR (Java) and CLIPScore happens back on the CPU machine:
``cliplab caption eval RUN --reuse-captions``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

WORK = Path("/tmp/cliplab-gpu")
LM_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def stage(parts: list[str]) -> None:
    (WORK / "parts").mkdir(parents=True, exist_ok=True)
    for p in parts:
        shutil.copy(p, WORK / "parts" / Path(p).name)
    print(sorted(x.name for x in (WORK / "parts").iterdir()))


def join(prefix: str, out: Path) -> Path:
    if out.is_file():
        return out
    parts = sorted((WORK / "parts").glob(prefix + ".part*"))
    with open(out, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    return out


def run(modes: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    lm = join("SmolLM2-135M-Instruct.Q4_1.gguf", WORK / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert hashlib.sha256(lm.read_bytes()).hexdigest() == LM_SHA, "decoder parts did not join to the known file"
    feats = join("flickr8k_caption_features.npz", WORK / "flickr8k_caption_features.npz")
    import torch

    from cliplab.caption.train import CaptionRunConfig, evaluate_captioner, train_captioner

    out = Path(os.environ.get("OUT", "/tmp/out"))
    runs = WORK / "runs"
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "modes": {}}
    for spec in modes:
        mode, _, epochs = spec.partition(":")
        overrides = [f"model.tuning={mode}", f"model.lm={lm}", f"data.features={feats}", "train.device=cuda",
                     "clipscore_model=none"] + ([f"train.epochs={epochs}"] if epochs else [])
        extra = os.environ.get(f"CAPTION_SET_{mode.upper()}", "")
        overrides += [x for x in extra.split(";") if x]
        cfg = CaptionRunConfig.load("flickr8k_caption").with_overrides(overrides)
        run_dir = runs / mode
        t0 = time.time()
        fit = train_captioner(cfg, run_dir, resume=True, progress=False)
        t1 = time.time()
        res = evaluate_captioner(run_dir, tokenizer="simple", device="cuda", progress=False, clipscore_model="none")
        summary["modes"][mode] = {"fit": fit, "wall_train_s": t1 - t0, "eval_s": time.time() - t1,
                                  "simple_tokenizer": {k: res["model"][k] for k in ("bleu4", "cider", "rouge_l")}}
        print(mode, json.dumps(summary["modes"][mode]), flush=True)
        (runs / "summary.json").write_text(json.dumps(summary, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    first = modes[0].partition(":")[0]  # its tuned weights come back too (the others: too large to carry)
    with tarfile.open(out / "caption_runs.tgz", "w:gz") as tar:
        for mode_dir in runs.iterdir():
            if not mode_dir.is_dir():
                continue
            for f in mode_dir.rglob("*"):
                if f.is_file() and f.name != "last.pt" and "tensorboard" not in f.parts and \
                        (f.suffix != ".safetensors" or mode_dir.name == first):
                    tar.add(f, arcname=str(f.relative_to(runs)))
        tar.add(runs / "summary.json", arcname="summary.json")
    print("packed", (out / "caption_runs.tgz").stat().st_size)


if __name__ == "__main__":
    {"stage": stage, "run": run}[sys.argv[1]](sys.argv[2:])
