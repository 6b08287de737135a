"""Peak memory and speed of text-LoRA training of a real-size CLIP (open_clip ViT-B-32, random weights) on CPU.

Each setting runs in a subprocess of its own (so each peak is its own), through cliplab's training path:
``load_clip`` -> ``set_trainable("none")`` -> ``tune_towers`` (text LoRA) -> the text inputs at the first
trainable stage (``cliplab.train.inputs.text_acts``: cached frozen prefix, or token batches) -> the text
stages after it -> InfoNCE against fixed image embeddings (the frozen, cached image side of a text-only
run) -> AdamW. Peak RSS is the larger of the child's own high-water mark (``ru_maxrss``) and the parent's
psutil samples (every 10 ms); captions/s is the batch size over the median timed step (after one warm-up
step; the median, because other jobs share this 2-core machine), captions/CPU-s the same over the process's
CPU time (all threads), less sensitive to those jobs; the ratios use it.

Settings (flags of one child run; the default matrix runs all four):
- ``before``: today's path before this change: the text side as one stage over open_clip's ``encode_text`` on
  77-token batches (``--no-trim``), adapters on the MLP ``c_fc``/``c_proj`` (the targets a user had to name);
- ``trimmed-mlp``: the same adapters, the text side as residual blocks with batches trimmed to the longest caption;
- ``trimmed``: the default targets (``attn``: PEFT's adapter of the fused attention), trimmed batches;
- ``trimmed+ckpt``: as ``trimmed`` with ``grad_checkpointing``.

    python bench/clip_memory.py [--data ../shared/data/flickr8k] [--batch-size 64] [--steps 2] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

SETTINGS = {
    "before": ["--no-trim", "--targets", "c_fc,c_proj"],
    "trimmed-mlp": ["--targets", "c_fc,c_proj"],
    "trimmed": [],
    "trimmed+ckpt": ["--checkpointing"],
}
GB = 1e9


def random_vit_b32(folder: Path) -> Path:
    """A randomly initialised open_clip ViT-B-32 saved as an open_clip folder (no pretrained weights offline)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder


def whole_text_stages(self, model, source):
    """Today's text stages before this change: one stage over ``encode_text`` (77 tokens), then the projection."""
    from cliplab.models.clip import _without
    from cliplab.models.stages import ParamHolder, Stage, Stages

    holder, project = self._text_projection(model)
    body = ParamHolder([p for n, p in model.named_parameters()
                        if not n.startswith(("visual.", "logit_", "text_projection"))], model.transformer)

    def encode(tokens):
        with _without(model, "text_projection"):
            return model.encode_text(tokens)

    return Stages([Stage("text", [body], encode), Stage("projection", [holder], project, is_block=False)])


def child(args: argparse.Namespace) -> None:
    """One setting: a few training steps; prints one JSON line."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cliplab.embed.cache import FeatureCache
    from cliplab.models import clip as clip_module
    from cliplab.models.tuning import TowerTuning
    from cliplab.train.inputs import text_acts
    from cliplab.train.losses import create_loss

    if args.no_trim:
        clip_module.OpenClipBackend.text_stages = whole_text_stages
    captions = json.loads(Path(args.captions).read_text())
    t0 = time.perf_counter()
    model = clip_module.load_clip(args.model).set_trainable("none")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    tuning = TowerTuning("lora", lora_targets=args.targets.split(",") if args.targets else None,
                         grad_checkpointing=args.checkpointing)
    counts = model.tune_towers(TowerTuning(), tuning)
    stages = model.text_stages()
    boundary = stages.first_trainable()
    with tempfile.TemporaryDirectory() as cache:
        acts = text_acts(stages, boundary, captions, model.tokenize, cache=FeatureCache(cache), device="cpu",
                         fingerprint=model.fingerprint(), progress=False)
        t_inputs = time.perf_counter() - t0
        image_emb = None  # the frozen image side of a text-only run: fixed embeddings
        loss_fn = create_loss("infonce")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        times, cpu, lengths, load = [], [], [], os.getloadavg()[0]
        for step in range(1 + args.steps):
            idx = np.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(captions)
            t, c = time.perf_counter(), time.process_time()
            x = acts.batch(idx, "cpu")
            lengths.append(int((x[0] if isinstance(x, tuple) else x).shape[1]))
            z = F.normalize(stages.run(x, boundary).float(), dim=-1)
            if image_emb is None:
                gen = torch.Generator().manual_seed(0)
                image_emb = F.normalize(torch.randn(len(captions), z.shape[-1], generator=gen), dim=-1)
            loss = loss_fn(image_emb[idx], z, model.logit_scale.exp(), image_ids=torch.as_tensor(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    timed = times[1:]
    print(json.dumps({
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "rss_after_load_gb": rss_loaded, "captions_per_s": args.batch_size / float(np.median(timed)),
        "captions_per_cpu_s": args.batch_size / float(np.median(cpu[1:])), "step_s": timed, "step_cpu_s": cpu[1:],
        "warmup_step_s": times[0], "load_average": [load, os.getloadavg()[0]], "tokens_per_caption_batch": lengths,
        "text_stage": stages[boundary].name, "trainable": counts["model"]["trainable"],
        "lora": counts.get("lora", {}).get("text", ""), "setup_s": t_inputs, "loss": float(loss.detach())}))


def run_setting(name: str, flags: list[str], args: argparse.Namespace, model: str, captions: str) -> dict:
    """Run one setting in a subprocess, sampling its RSS with psutil."""
    import psutil

    cmd = [sys.executable, __file__, "--child", "--model", model, "--captions", captions,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, sampled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            sampled = max(sampled, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["psutil_peak_rss_gb"] = sampled / GB
    result["peak_rss_gb"] = max(result["peak_rss_gb"], result["psutil_peak_rss_gb"])
    result["flags"] = " ".join(flags)
    print(f"{name}: {result['peak_rss_gb']:.2f} GB, {result['captions_per_s']:.1f} captions/s, "
          f"{result['captions_per_cpu_s']:.1f} per CPU-s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--model", default=None,
                    help="an open_clip folder (default: a random ViT-B-32, saved to a temp dir)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--captions", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-trim", action="store_true", help="today's untrimmed one-stage text path (child)")
    ap.add_argument("--targets", default="", help="comma-separated LoRA targets (child; default: cliplab's)")
    ap.add_argument("--checkpointing", action="store_true", help="grad_checkpointing on (child)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    from cliplab.data import read_flickr8k

    n = args.batch_size * (args.steps + 1)
    captions = read_flickr8k(args.data, "train").captions[:n]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_vit_b32(Path(tmp) / "vit-b-32"))
        caption_file = Path(tmp) / "captions.json"
        caption_file.write_text(json.dumps(list(captions)))
        results = {name: run_setting(name, SETTINGS[name], args, model, str(caption_file))
                   for name in args.settings.split(",")}
    report(results, args, len(captions))


def report(results: dict, args: argparse.Namespace, n_captions: int) -> None:
    base = results.get("before")
    rows = []
    for name, r in results.items():
        ratio = f"{base['peak_rss_gb'] / r['peak_rss_gb']:.2f}x less" if base and name != "before" else ""
        speed = (f"{r['captions_per_cpu_s'] / base['captions_per_cpu_s']:.2f}x" if base and name != "before"
                 else "")
        rows.append((name, f"{r['peak_rss_gb']:.2f}", ratio, f"{r['captions_per_s']:.1f}",
                     f"{r['captions_per_cpu_s']:.1f}", speed,
                     f"{sum(r['tokens_per_caption_batch'][1:]) / len(r['tokens_per_caption_batch'][1:]):.0f}",
                     r["text_stage"], f"{r['trainable']:,}", r["lora"]))
    print(table(rows, ("setting", "peak RSS GB", "vs before", "captions/s", "captions/CPU-s", "vs before",
                       "tokens/batch", "text inputs at", "trainable", "LoRA targets")))
    headline = results.get("trimmed") or next(iter(results.values()))
    save("clip_memory", {
        "protocol": (f"open_clip ViT-B-32 (random weights, 151 M parameters), text-LoRA (r 8) training on CPU at "
                     f"batch {args.batch_size}: {args.steps} timed steps after 1 warm-up step (captions/s and "
                     f"captions/CPU-s from the median step), Flickr8k train captions ({n_captions}, file order), "
                     "InfoNCE against fixed image embeddings, AdamW; each setting in its own subprocess; peak RSS "
                     "= max(ru_maxrss, psutil samples every 10 ms), in GB (1e9 bytes), model loading included"),
        "clip.lora.peak_rss_gb": round(headline["peak_rss_gb"], 2),
        "clip.lora.captions_per_s": round(headline["captions_per_s"], 1),
        "clip.lora.captions_per_cpu_s": round(headline["captions_per_cpu_s"], 1),
        "before": ({k: results["before"][k] for k in ("peak_rss_gb", "captions_per_s", "captions_per_cpu_s")}
                   if base else None),
        "settings": results,
    })


if __name__ == "__main__":
    main()
