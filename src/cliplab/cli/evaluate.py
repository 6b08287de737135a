"""Evaluation commands: ``eval retrieval | zeroshot | probe`` (``zeroshot`` and ``probe`` also keep their old
top-level names) and ``embed``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cliplab.cli.common import (DEFAULT_DATA, BackendOpt, CacheOpt, DeviceOpt, OnErrorOpt, PlotsOpt, RunDirOpt, app,
                                check_plots_extra, console, eval_app, load_run_config, print_retrieval,
                                print_run_dir, print_skips, print_table, run_dir_for, with_options)
from cliplab.errors import CliplabError

ModelOpt = typer.Option("conse", "--model", "-m", help="trained model dir, 'conse' or 'clip:SPEC'")


@eval_app.command("retrieval")
def eval_retrieval(
    data: str = typer.Argument(DEFAULT_DATA, help="dataset: Flickr8k folder, COCO/Karpathy JSON, CSV or JSONL"),
    model: List[str] = typer.Option(["conse"], "--model", "-m",
                                    help="trained model dir, 'conse', or 'clip:SPEC' (see load_clip); repeatable"),
    split: str = typer.Option("test"),
    image_root: Optional[Path] = typer.Option(None),
    run_dir: Optional[Path] = RunDirOpt,
    on_error: Optional[str] = OnErrorOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    plots: bool = PlotsOpt,
    flip_tta: Optional[bool] = typer.Option(None, "--flip-tta/--no-flip-tta", help="average each image's embedding "
                                            "with its mirror's (default: the model's setting; off for single models)"),
) -> None:
    """Recall@1/5/10 both ways, MRR and ranks for one or more models on one dataset split."""
    from cliplab.experiments import run_retrieval

    run = run_retrieval(data, model, split=split, image_root=image_root, on_error=on_error or "raise",
                        cache=cache_dir, device=device, flip_tta=flip_tta, run_dir=run_dir_for(run_dir, "eval"),
                        plots=plots)
    for report in run.skipped.values():
        print_skips(report)
    print_retrieval(run.results, run.title)
    print_run_dir(run.run_dir)


def print_classification(run) -> None:
    """A zero-shot or probe run's results as the printed table (the rows of its results.md)."""
    from cliplab.experiments import classification_rows

    print_table(*classification_rows(run.results, run.key_label), title=run.title)


@with_options("classes", "rename", "run_dir", "cache_dir", "device", "seed", "plots")
def zeroshot(
    data: str = typer.Argument(..., help="labelled images: class-per-folder tree, CIFAR pickle folder or image,label CSV"),
    model: str = ModelOpt,
    split: Optional[str] = typer.Option(None, help="split to classify (default: test when DATA has splits, "
                                                   "else all images)"),
    variant: List[str] = typer.Option([], "--variant", "-v",
                                      help="prompt variant: a named set (photo, name, simple7, clip80, prefixed, "
                                           "negated) or a template with {} (repeatable; default: all named sets)"),
    similarity: str = typer.Option("both", help="cosine, dot or both"),
    top5: int = typer.Option(8, help="save top-5 class probabilities for this many random images"),
    self_train: Optional[str] = typer.Option(None, "--self-train",
                                             help="a split of DATA used as unlabelled images (e.g. train; its "
                                                  "labels are never read): the zero-shot classifier's surest "
                                                  "predictions there train a logistic classifier on image features, "
                                                  "scored on --split beside plain zero-shot"),
    features_model: Optional[str] = typer.Option(None, help="--self-train: model whose image-tower features the "
                                                            "self-trained classifier uses (default: --model)"),
    features_flip: bool = typer.Option(True, "--features-flip/--no-features-flip",
                                       help="--self-train: average each image's features with its mirror's"),
    self_train_fractions: str = typer.Option("0.1,0.3,0.5,0.7,0.9",
                                             help="--self-train: share of each class's pseudo-labels per round"),
    self_train_c: float = typer.Option(0.002, help="--self-train: inverse L2 regularisation of the classifier"),
    self_train_selection: str = typer.Option("balanced", help="--self-train: balanced (the same number of "
                                                              "pseudo-labels per class: for roughly balanced "
                                                              "classes) or proportional (a share of each class's "
                                                              "predictions: for unbalanced pools)"),
    **options,
) -> None:
    """Zero-shot accuracy/F1 for prompt variants side by side, cosine vs dot product; optionally refined by
    self-training on unlabelled images (--self-train)."""
    from cliplab.experiments import run_zeroshot

    run = run_zeroshot(data, model, split=split, variants=variant, similarity=similarity, top5=top5,
                       self_train=self_train, features_model=features_model, features_flip=features_flip,
                       self_train_fractions=self_train_fractions, self_train_c=self_train_c,
                       self_train_selection=self_train_selection, **_classification_options(options, "zeroshot"),
                       log=lambda msg: console.print(msg, highlight=False))
    print_classification(run)
    if run.cosine_vs_dot:
        console.print(run.cosine_vs_dot["explanation"], highlight=False)
    console.print(f"embedding: {run.seconds['embed']:.1f}s, classification of all variants: "
                  f"{run.seconds['classify']:.1f}s")
    if run.self_training:
        console.print(f"self-training: {run.self_training['protocol']}", highlight=False)
    print_run_dir(run.run_dir)


def _classification_options(options: dict, kind: str) -> dict:
    """The shared options as the library call's keywords (the run folder defaulting to runs/KIND-TIMESTAMP)."""
    return {"classes": options["classes"], "rename": options["rename"], "seed": options["seed"],
            "run_dir": run_dir_for(options["run_dir"], kind), "cache": options["cache_dir"],
            "device": options["device"], "plots": options["plots"]}


@with_options("classes", "rename", "run_dir", "cache_dir", "device", "seed", "plots")
def probe(
    data: str = typer.Argument(..., help="labelled images (e.g. ../shared/data/cifar10): with train/test splits, or "
                                         "without (a stratified held-out test split is made)"),
    model: str = ModelOpt,
    train_split: Optional[str] = typer.Option(None, help="training split (default: train, when DATA has splits)"),
    test_split: Optional[str] = typer.Option(None, help="test split (default: test, when DATA has splits)"),
    test_fraction: float = typer.Option(0.2, help="DATA without splits: share of each class held out for testing"),
    method: List[str] = typer.Option(["logistic", "torch"], "--method", help="logistic and/or torch"),
    few_shot: int = typer.Option(0, help="k training images per class (0 = all; k >= 2, one is kept for "
                                         "validation)"),
    variant: str = typer.Option("clip80", help="prompt variant for the zero-shot comparison"),
    flip_tta: bool = typer.Option(True, "--flip-tta/--no-flip-tta",
                                  help="average features of each image and its mirror (train and test)"),
    power_norm: bool = typer.Option(True, "--power-norm/--no-power-norm",
                                    help="signed square root of features before standardising"),
    flip_train: bool = typer.Option(False, "--flip-train",
                                    help="logistic probe: fit on each training image and its mirror as two samples "
                                         "(with --flip-tta; validation and test images keep the averaged features)"),
    features: Optional[str] = typer.Option(None, "--features",
                                           help="the probe's image features: image towers side by side, "
                                                "comma-separated ARCH[@SIZE] (e.g. lite0,lite2@224: Lite2 at "
                                                "224 px; default: --model's image features)"),
    **options,
) -> None:
    """Linear probe(s) on frozen image features vs zero-shot, on the same held-out test images."""
    from cliplab.experiments import run_probe

    run = run_probe(data, model, train_split=train_split, test_split=test_split, test_fraction=test_fraction,
                    methods=method, few_shot=few_shot, variant=variant, flip_tta=flip_tta, power_norm=power_norm,
                    flip_train=flip_train, features=features.split(",") if features else None,
                    **_classification_options(options, "probe"))
    print_classification(run)
    console.print(f"protocol: {run.protocol_line()}", highlight=False)
    for name, r in run.results.items():
        if "fit" in r:
            console.print(f"{name}: {r['fit']['hyperparameters']} (validation accuracy {r['fit']['val_accuracy']:.2f})",
                          highlight=False)
    print_run_dir(run.run_dir)


for _command in (zeroshot, probe):  # `eval zeroshot` is the name; `cliplab zeroshot` stays as the old alias
    eval_app.command(_command.__name__)(_command)
    app.command(_command.__name__, hidden=True)(_command)


@app.command()
def embed(
    data: str = typer.Argument(DEFAULT_DATA, help="dataset: Flickr8k folder, COCO/Karpathy JSON, CSV or JSONL"),
    split: str = typer.Option("all", help="train, dev, test or all"),
    image_root: Optional[Path] = typer.Option(None, help="image folder for JSON/CSV datasets"),
    config: Optional[str] = typer.Option(None, help="run config, a packaged name or a YAML path (its model section "
                                                   "picks the towers)"),
    run_dir: Optional[Path] = typer.Option(None, help="where to write the run record"),
    on_error: Optional[str] = OnErrorOpt,
    cache_dir: Optional[Path] = CacheOpt,
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    engine: str = typer.Option("local", help="local, or ray: image chunks computed by a pool of Ray actors"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS, else a "
                                                         "local cluster)"),
    ray_actors: int = typer.Option(2, help="actors (one image tower each)"),
) -> None:
    """Compute (or reuse) frozen-tower features for a dataset."""
    from cliplab.experiments import run_embed

    cfg = load_run_config(config, data, on_error, cache_dir, [])
    if cfg.model_kind != "twotower":
        raise CliplabError(f"--config: `cliplab embed` caches the frozen towers of a two-tower config; this one's "
                           f"model.kind is {cfg.model_kind!r} (its embeddings are computed by `eval retrieval -m`)")
    run = run_embed(data, cfg.model.image, cfg.model.text, split=split, image_root=image_root,
                    on_error=cfg.data.on_error, cache=cfg.data.cache_dir, device=device, batch_size=batch_size,
                    backend=backend, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
                    run_dir=run_dir_for(run_dir, "embed"))
    s = run.summary
    print_table(["field", "value"], [[k, s[k]] for k in ("images", "captions", "image_dim", "text_dim",
                                                          "reused_cache", "seconds", "skipped")], run.title)
    print_skips(run.skipped)
    print_run_dir(run.run_dir)
