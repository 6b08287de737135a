"""Captioning commands: ``caption train | features | eval | generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cliplab import rundir
from cliplab.cli.common import (CacheOpt, DeviceOpt, PlotsOpt, SetOpt, caption_app, check_choices, check_plots_extra,
                                console, log_line, print_run_dir, print_table, run_dir_for)
from cliplab.errors import CliplabError


@caption_app.command("train")
def caption_train(
    config: str = typer.Option("flickr8k_caption", "--config", "-c", help="caption config: packaged name or YAML path"),
    run_dir: Optional[Path] = typer.Option(None, help="run directory (an existing one is resumed)"),
    data: Optional[str] = typer.Option(None, help="dataset (overrides data.path)"),
    overrides: List[str] = SetOpt,
    max_train_images: Optional[int] = typer.Option(None, help="train on the first N training images (a quick demo)"),
    cache_dir: Optional[Path] = CacheOpt,
    fresh: bool = typer.Option(False, help="ignore a checkpoint in run_dir and start over"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="evaluate on the test split after training"),
    plots: bool = PlotsOpt,
) -> None:
    """Train a captioner (mapping network + prefix/LoRA/adapter/full tuning of the LM), select on dev CIDEr-D."""
    check_plots_extra(plots)
    from cliplab.caption.train import CaptionRunConfig, evaluate_captioner, train_captioner

    extra = list(overrides) + ([f"data.path={data}"] if data else []) + \
        ([f"train.max_train_images={max_train_images}"] if max_train_images else []) + \
        ([f"data.cache_dir={cache_dir}"] if cache_dir else [])
    cfg = CaptionRunConfig.load(config).with_overrides(extra)
    out = run_dir_for(run_dir, "caption")
    fit = train_captioner(cfg, out, resume=not fresh, log=log_line)
    from cliplab.eval.evaluators import CaptionEvaluator

    metric = fit.get("select_metric", "cider")
    console.print(f"best dev epoch {fit['best_epoch']} (dev {CaptionEvaluator.label(metric)} "
                  f"{fit[f'best_dev_{metric}']:.1f}); training {fit['seconds']['train'] / 60:.1f} min", highlight=False)
    if evaluate:
        print_caption_result(evaluate_captioner(out, plots=plots, log=console.print))
    print_run_dir(out)


def print_caption_result(result: dict) -> None:
    from cliplab.eval.evaluators import CaptionEvaluator

    columns = CaptionEvaluator.brief_columns()
    rows = [[label, *["n/a" if result[name].get(k) is None else f"{result[name][k]:.2f}" for k, _ in columns]]
            for name, label in (("model", "captioner"), ("nearest_neighbour", "nearest neighbour"))]
    print_table(["model", *[h for _, h in columns]], rows,
                f"captioning: {result['split']} ({result['n_images']} images, beam {result['beam']})")
    console.print(f"* {result['clipscore_note']}. SPICE: {result['model']['spice_status']}.", highlight=False,
                  markup=False)


@caption_app.command("features")
def caption_features(
    out: Path = typer.Option(..., "--out", "-o", help="bundle file (.npz) to write"),
    config: str = typer.Option("flickr8k_caption", "--config", "-c"),
    overrides: List[str] = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Export the visual tokens + captions of train/dev/test to one file (train elsewhere with data.features)."""
    from cliplab.caption.train import CaptionRunConfig, export_bundle
    from cliplab.utils import resolve_device

    cfg = CaptionRunConfig.load(config).with_overrides(list(overrides))
    path = export_bundle(cfg, out, device=resolve_device(device))
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", soft_wrap=True)


@caption_app.command("eval")
def caption_eval(
    run: Path = typer.Argument(..., help="caption run folder"),
    split: str = typer.Option("test", help="test or dev"),
    beam: Optional[int] = typer.Option(None, help="beam size (default: the run's decode.beam)"),
    tokenizer: str = typer.Option("ptb", help="ptb (official, needs Java) or simple"),
    clipscore_model: Optional[str] = typer.Option(None, help="cliplab model for CLIPScore (default: the config's; "
                                                             "none skips it)"),
    reuse_captions: bool = typer.Option(False, help="score the captions of the last evaluation again (e.g. "
                                                    "generated on another machine) instead of decoding"),
    rerank_k: Optional[int] = typer.Option(None, help="consensus re-ranking against the captions of the K most "
                                                      "similar training images (0: off; default: the run's "
                                                      "decode.rerank_k)"),
    device: str = DeviceOpt,
    plots: bool = PlotsOpt,
) -> None:
    """Score a trained captioner (BLEU, METEOR, ROUGE-L, CIDEr-D, CLIPScore) beside the nearest-neighbour baseline."""
    check_plots_extra(plots)
    from cliplab.caption.train import evaluate_captioner

    check_choices("--tokenizer", [tokenizer], ("ptb", "simple"))
    check_choices("--split", [split], ("test", "dev"))
    if rerank_k is not None and rerank_k < 0:
        raise CliplabError("--rerank-k must be >= 0")
    out_name = rundir.caption_results(split)  # dev scoring never hides the test captions
    result = evaluate_captioner(run, split=split, beam=beam, tokenizer=tokenizer, device=device, plots=plots,
                                clipscore_model=clipscore_model, reuse_captions=reuse_captions, out_name=out_name,
                                rerank_k=rerank_k)
    print_caption_result(result)
    console.print(f"captions and metrics: {run / out_name}", soft_wrap=True)


@caption_app.command("generate")
def caption_generate(
    run: Path = typer.Argument(..., help="caption run folder (or its best/ model folder)"),
    images: List[Path] = typer.Argument(..., help="image files"),
    beam: int = typer.Option(3, help="beam size (1 = greedy)"),
    max_new_tokens: int = typer.Option(30),
    rerank_k: int = typer.Option(0, help="consensus re-ranking of the beam's candidates against the captions of "
                                         "the K most similar training images (0: the beam's best)"),
    json_out: bool = typer.Option(False, "--json"),
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
) -> None:
    """Caption image files with a trained captioner (visual tokens from the feature cache)."""
    from cliplab.caption.files import caption_files

    captions = caption_files(run, images, beam=beam, max_new_tokens=max_new_tokens, rerank_k=rerank_k,
                             device=device, cache_dir=cache_dir)
    if json_out:
        print(json.dumps([{"image": str(p), "caption": captions[str(p)]} for p in images]))
        return
    for p in images:
        console.print(f"{p}: {captions[str(p)]}", highlight=False, markup=False)
