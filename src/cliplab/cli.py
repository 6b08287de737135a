"""Command-line interface: ``cliplab embed | train | sweep | eval retrieval | zeroshot | probe | demo``.

Every command writes a run directory (config, metrics JSON, a markdown table) and prints a table.
User errors print as one line (``error: ...``) with exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliplab import rundir
from cliplab.errors import CliplabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learn and evaluate shared image-text embedding spaces.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models.")
app.add_typer(eval_app, name="eval")
caption_app = typer.Typer(no_args_is_help=True, help="Caption images with a tuned pretrained language model.")
app.add_typer(caption_app, name="caption")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get whole tables
DEFAULT_DATA = "../shared/data/flickr8k"


def _print_retrieval(results: dict[str, dict[str, float]], title: str) -> None:
    from cliplab.eval.tables import retrieval_rows

    header, rows = retrieval_rows(results)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _run_dir(run_dir: Optional[Path], prefix: str) -> Path:
    return run_dir or Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load_config(config: Optional[str | Path], data: Optional[str], on_error: Optional[str], cache_dir: Optional[Path],
                 overrides: List[str]):
    from cliplab.train.config import RunConfig

    cfg = RunConfig.load(config) if config else RunConfig()  # a path or a packaged config name
    extra = list(overrides)
    if data:
        extra.append(f"data.path={data}")
    if on_error:
        extra.append(f"data.on_error={on_error}")
    if cache_dir:
        extra.append(f"data.cache_dir={cache_dir}")
    return cfg.with_overrides(extra) if extra else cfg


OnErrorOpt = typer.Option(None, "--on-error", help="raise (default) or skip bad images/captions and count them")
CacheOpt = typer.Option(None, "--cache-dir", help="feature cache folder (default $CLIPLAB_CACHE or ~/.cache/cliplab)")
SetOpt = typer.Option([], "--set", "-s", help="config override KEY=VALUE, e.g. train.lr=3e-4 (repeatable)")
PlotsOpt = typer.Option(False, "--plots", help="also write the figures (PNG + data) to RUN_DIR/plots/")
RunDirOpt = typer.Option(None, "--run-dir", help="run folder to write (default runs/KIND-TIMESTAMP)")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda")
SeedOpt = typer.Option(0, "--seed")
BackendOpt = typer.Option("auto", help="frozen-tower inference: auto (ONNX Runtime on CPU, torch on CUDA), "
                                       "torch, onnx or onnx-int8 (quantised, changes results)")


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
    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import tower_features
    from cliplab.models.factory import pretrained_tower
    from cliplab.utils import resolve_device, write_json

    cfg = _load_config(config, data, on_error, cache_dir, [])
    if cfg.model_kind != "twotower":
        raise CliplabError(f"--config: `cliplab embed` caches the frozen towers of a two-tower config; this one's "
                           f"model.kind is {cfg.model_kind!r} (its embeddings are computed by `eval retrieval -m`)")
    out = _run_dir(run_dir, "embed")
    t0 = time.time()
    ds = load_caption_dataset(data, split, image_root=image_root, on_error=cfg.data.on_error)
    image_tower, text_tower = pretrained_tower(cfg.model.image), pretrained_tower(cfg.model.text)
    feats = tower_features(image_tower, text_tower, ds, cache=FeatureCache(cfg.data.cache_dir),
                           on_error=cfg.data.on_error, device=resolve_device(device), image_batch_size=batch_size,
                           backend=backend, engine=engine, ray_address=ray_address, ray_actors=ray_actors)
    summary = {"dataset": feats.dataset.name, "images": feats.dataset.num_images,
               "captions": feats.dataset.num_captions, "image_dim": int(feats.image.shape[1]),
               "text_dim": int(feats.text.shape[1]), "reused_cache": feats.reused,
               "seconds": round(time.time() - t0, 2), **feats.dataset.skipped.to_dict()}
    write_json(out / rundir.CONFIG, {"data": data, "split": split, "model": cfg.model.to_dict(),
                                     "provenance": rundir.provenance()})
    write_json(out / rundir.EMBED, summary)
    table = Table(title=f"features: {feats.dataset.name}")
    for k in ("images", "captions", "image_dim", "text_dim", "reused_cache", "seconds", "skipped"):
        table.add_row(k, str(summary[k]))
    console.print(table)
    _print_skips(feats.dataset.skipped)
    console.print(f"run directory: {out}", soft_wrap=True)


def _print_skips(report) -> None:
    if len(report):
        console.print(f"[yellow]{report.summary()}[/yellow]")
        for kind, msg in report.items[:20]:
            console.print(f"  - {kind}: {msg}", highlight=False, markup=False)


@app.command()
def train(
    data: Optional[str] = typer.Argument(None, help="dataset (overrides data.path of the config)"),
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="run config: a packaged name (flickr8k_heads, see `cliplab configs`) "
                                              "or a YAML path"),
    run_dir: Optional[Path] = typer.Option(None, help="run directory (an existing one is resumed)"),
    on_error: Optional[str] = OnErrorOpt,
    cache_dir: Optional[Path] = CacheOpt,
    overrides: List[str] = SetOpt,
    fresh: bool = typer.Option(False, help="ignore a checkpoint in run_dir and start over"),
    track_test: bool = typer.Option(False, help="also log test recall every epoch (for curves; never selects)"),
    plots: bool = PlotsOpt,
) -> None:
    """Train heads (and tower blocks / LoRA adapters, see train.image_tower / train.text_tower); evaluates
    test retrieval against the zero-shot baseline. Runs data-parallel under torchrun."""
    _check_plots_extra(plots)
    from cliplab.train.run import train_run

    cfg = _load_config(config, data, on_error, cache_dir, overrides)
    out = _run_dir(run_dir, "train")
    results = train_run(cfg, out, resume=not fresh, log=lambda m: console.print(m, highlight=False),
                        track_test=track_test, plots=plots)
    _report_train(results, out)


def _report_train(results: dict, out: Path) -> None:
    _print_retrieval(results["test"], f"test retrieval ({results['data']['test']['name']})")
    fit = results["fit"]
    console.print(f"best dev epoch: {fit['best_epoch']}  features: {results['seconds']['features']:.0f}s  "
                  f"training: {results['seconds']['train']:.0f}s  total: {results['seconds']['total']:.0f}s"
                  f"{'  (features from cache)' if results['features_reused'] else ''}")
    if results["skipped_total"]:
        console.print(f"[yellow]skipped {results['skipped_total']} items[/yellow]")
        for split in results["skipped"].values():
            for kind, msg in split["items"][:20]:
                console.print(f"  - {kind}: {msg}", highlight=False, markup=False)
    console.print(f"run directory: {out}", soft_wrap=True)


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
    _check_plots_extra(plots)
    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics
    from cliplab.eval.tables import retrieval_markdown
    from cliplab.models.factory import load_model
    from cliplab.utils import resolve_device, write_json, write_text

    out = _run_dir(run_dir, "eval")
    dev = resolve_device(device)
    mode = on_error or "raise"
    ds = load_caption_dataset(data, split, image_root=image_root, on_error=mode)
    cache = FeatureCache(cache_dir)
    results, spaces = {}, {}
    for spec in model:
        m = load_model(spec)
        img, txt, used = encode_dataset(m, ds, cache=cache, on_error=mode, device=dev, flip_tta=flip_tta)
        results[spec] = retrieval_metrics(img, txt, used.caption_image, device=dev).metrics
        spaces[spec] = (img, txt)
        _print_skips(used.skipped)
    write_json(out / rundir.CONFIG, {"data": data, "split": split, "models": model, "on_error": mode,
                                     "flip_tta": flip_tta, "provenance": rundir.provenance()})
    write_json(out / rundir.EVAL_METRICS, results)
    write_text(out / rundir.RESULTS_MD, retrieval_markdown(results, f"{ds.name}"))
    if plots:
        from cliplab.viz.runs import plot_retrieval

        plot_retrieval(out, used, spaces)
    _print_retrieval(results, f"retrieval: {ds.name}")
    console.print(f"run directory: {out}", soft_wrap=True)


def _check_plots_extra(plots: bool) -> None:
    """``--plots`` needs the ``viz`` extra: say so before any work, not after training."""
    if plots:
        from cliplab.extras import require

        require("matplotlib", "--plots")


def _check_choices(option: str, values, choices) -> None:
    for v in values:
        if v not in choices:
            raise CliplabError(f"{option} must be one of {', '.join(choices)}, not {v!r}")


def _classification_table(run) -> Table:
    """A zero-shot or probe run's results as the printed table (the rows of its results.md)."""
    from cliplab.experiments import classification_rows

    header, rows = classification_rows(run.results, run.key_label)
    table = Table(title=run.title)
    for h in header:
        table.add_column(h, justify="left" if h == run.key_label else "right")
    for row in rows:
        table.add_row(*row)
    return table


ClassesOpt = typer.Option(None, "--classes", help="file with one class name per line (fixes names and order)")
RenameOpt = typer.Option([], "--rename", help="rename a class for prompts, OLD=NEW (repeatable)")


@app.command()
def zeroshot(
    data: str = typer.Argument(..., help="labelled images: class-per-folder tree, CIFAR pickle folder or image,label CSV"),
    model: str = typer.Option("conse", "--model", "-m", help="trained model dir, 'conse' or 'clip:SPEC'"),
    split: Optional[str] = typer.Option(None, help="split to classify (default: test when DATA has splits, "
                                                   "else all images)"),
    variant: List[str] = typer.Option([], "--variant", "-v",
                                      help="prompt variant: a named set (photo, name, simple7, clip80, prefixed, "
                                           "negated) or a template with {} (repeatable; default: all named sets)"),
    similarity: str = typer.Option("both", help="cosine, dot or both"),
    classes: Optional[Path] = ClassesOpt,
    rename: List[str] = RenameOpt,
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
    run_dir: Optional[Path] = RunDirOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    plots: bool = PlotsOpt,
) -> None:
    """Zero-shot accuracy/F1 for prompt variants side by side, cosine vs dot product; optionally refined by
    self-training on unlabelled images (--self-train)."""
    from cliplab.experiments import run_zeroshot

    run = run_zeroshot(data, model, split=split, variants=variant, similarity=similarity, classes=classes,
                       rename=rename, top5=top5, self_train=self_train, features_model=features_model,
                       features_flip=features_flip, self_train_fractions=self_train_fractions,
                       self_train_c=self_train_c, self_train_selection=self_train_selection,
                       run_dir=_run_dir(run_dir, "zeroshot"),
                       cache=cache_dir, device=device, seed=seed, plots=plots,
                       log=lambda msg: console.print(msg, highlight=False))
    console.print(_classification_table(run))
    if run.cosine_vs_dot:
        console.print(run.cosine_vs_dot["explanation"], highlight=False)
    console.print(f"embedding: {run.seconds['embed']:.1f}s, classification of all variants: "
                  f"{run.seconds['classify']:.1f}s")
    if run.self_training:
        console.print(f"self-training: {run.self_training['protocol']}", highlight=False)
    console.print(f"run directory: {run.run_dir}", soft_wrap=True)


@app.command()
def probe(
    data: str = typer.Argument(..., help="labelled images (e.g. ../shared/data/cifar10): with train/test splits, or "
                                         "without (a stratified held-out test split is made)"),
    model: str = typer.Option("conse", "--model", "-m", help="trained model dir, 'conse' or 'clip:SPEC'"),
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
    classes: Optional[Path] = ClassesOpt,
    rename: List[str] = RenameOpt,
    run_dir: Optional[Path] = RunDirOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    plots: bool = PlotsOpt,
) -> None:
    """Linear probe(s) on frozen image features vs zero-shot, on the same held-out test images."""
    from cliplab.experiments import run_probe

    run = run_probe(data, model, train_split=train_split, test_split=test_split, test_fraction=test_fraction,
                    methods=method, few_shot=few_shot, variant=variant, flip_tta=flip_tta, power_norm=power_norm,
                    flip_train=flip_train, classes=classes, rename=rename, run_dir=_run_dir(run_dir, "probe"),
                    cache=cache_dir, device=device, seed=seed, plots=plots)
    console.print(_classification_table(run))
    console.print(f"protocol: {run.protocol_line()}", highlight=False)
    for name, r in run.results.items():
        if "fit" in r:
            console.print(f"{name}: {r['fit']['hyperparameters']} (validation accuracy {r['fit']['val_accuracy']:.2f})",
                          highlight=False)
    console.print(f"run directory: {run.run_dir}", soft_wrap=True)


@app.command()
def sweep(
    sweep_file: str = typer.Argument(..., help="sweep YAML (path or packaged name): base config, fixed overrides "
                                              "and a grid of values"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="folder for the runs and tables"),
    fresh: bool = typer.Option(False, help="start every run over (a run folder left by another config is refused "
                                           "otherwise)"),
    test: str = typer.Option("all", help="all: track test for every run (studies); selected: evaluate test only "
                                         "for the run the dev split selects"),
    plots: bool = PlotsOpt,
) -> None:
    """Run a grid of training configs one after another (features cached once) and tabulate them."""
    _check_plots_extra(plots)
    from cliplab.train.sweep import run_sweep

    out = out_dir or Path("runs") / f"sweep-{Path(sweep_file).stem}"
    rows = run_sweep(sweep_file, out, log=lambda m: console.print(m, highlight=False), fresh=fresh, test=test)
    table = Table(title=f"sweep: {Path(sweep_file).name}")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # the selected run adds its test columns
    for h in columns:
        table.add_column(h)
    for r in rows:
        table.add_row(*[str(r.get(h, "")) for h in columns])
    console.print(table)
    if plots:
        from cliplab.viz.runs import plot_sweep

        plot_sweep(out)
    console.print(f"tables: {out / rundir.RESULTS_MD}, {out / rundir.CURVES}", soft_wrap=True)


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="run folders: train, eval, zeroshot, probe or sweep outputs"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: str = typer.Option("cliplab report"),
    screenshots: Optional[Path] = typer.Option(None, help="also save a PNG of each report section here "
                                                          "(headless Chromium via Playwright)"),
) -> None:
    """One self-contained HTML page (metrics, comparisons, figures, galleries) for one or more runs."""
    from cliplab.viz.report import build_report, screenshot_sections

    path = build_report(run_dirs, out, title=title)
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)", soft_wrap=True)
    if screenshots:
        for shot in screenshot_sections(path, screenshots):
            console.print(f"screenshot: {shot}", soft_wrap=True)


@app.command()
def demo(
    data: str = typer.Option(DEFAULT_DATA, help="Flickr8k folder"),
    run_dir: Path = typer.Option(Path("runs/demo")),
    config: str = typer.Option("flickr8k_heads", "--config", "-c",
                               help="run config: a packaged name (see `cliplab configs`) or a YAML path"),
    cache_dir: Optional[Path] = CacheOpt,
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write the run's figures to RUN_DIR/plots/"),
) -> None:
    """Flickr8k end to end: ConSE baseline vs heads trained on frozen offline towers (1k test images)."""
    _check_plots_extra(plots)
    from cliplab.configs import resolve_config
    from cliplab.train.run import train_run

    path = resolve_config(config)  # the packaged demo config by default; a missing one is an error, never defaults
    if not Path(data).exists():
        raise CliplabError(f"demo data not found: {data} (pass --data or DATA=... to make demo)")
    cfg = _load_config(path, data, None, cache_dir, [])
    console.print(f"[bold]cliplab demo[/bold]: {data} -> {run_dir} (config {path.name})")
    results = train_run(cfg, run_dir, resume=False, log=lambda m: console.print(m, highlight=False), plots=plots)
    _report_train(results, run_dir)


@app.command()
def index(
    paths: List[Path] = typer.Argument(..., help="photo folders (searched recursively) or caption datasets "
                                                 "(Flickr8k folder, COCO/Karpathy JSON, CSV/JSONL)"),
    out: Path = typer.Option(..., "--out", "-o", help="index folder: new, empty or an existing index (anything "
                                                      "else is refused; one inside a photo folder is not indexed)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="run/model folder, 'conse' or 'clip:SPEC' "
                                                                    "(default: the index's model, else conse)"),
    rebuild: bool = typer.Option(False, help="re-embed everything (needed to change the model)"),
    faiss_kind: str = typer.Option("auto", "--faiss", help="auto (exact below 50k images, HNSW above), flat, "
                                                           "hnsw or ivf"),
    dtype: str = typer.Option("float32", help="stored vectors: float32 or float16"),
    max_pixels: int = typer.Option(100_000_000, help="skip images declaring more pixels than this"),
    batch_size: int = typer.Option(64),
    chunk_size: int = typer.Option(256, help="images per resumable work chunk, on average (a killed run loses "
                                             "at most one; chunks are keyed by their files)"),
    formats: str = typer.Option("jpeg,png,webp,bmp,gif", help="image formats to decode (comma-separated Pillow "
                                                              "names; tiff possible)"),
    device: str = DeviceOpt,
    engine: str = typer.Option("local", help="local, or ray (image chunks embedded by Ray actors)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)"),
    ray_actors: int = typer.Option(2),
    json_out: bool = typer.Option(False, "--json", help="print the build report as JSON"),
) -> None:
    """Index photos for search: embeddings + FAISS + SQLite metadata; re-runs embed only new/changed files."""
    import json as _json

    from cliplab.serve.index import IndexBuilder
    from cliplab.utils import resolve_device

    builder = IndexBuilder(out, model, rebuild=rebuild, faiss_kind=faiss_kind, dtype=dtype,
                           device=str(resolve_device(device)), batch_size=batch_size, max_pixels=max_pixels,
                           chunk_size=chunk_size, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
                           formats=[f.strip() for f in formats.split(",") if f.strip()],
                           log=lambda m: console.print(m, highlight=False, markup=False), progress=not json_out)
    report = builder.build(paths)
    if json_out:
        print(_json.dumps(report.to_dict()))
        return
    table = Table(title=f"index {out} (generation {report.generation})", show_header=False, title_justify="left")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("total", "new", "changed", "unchanged", "removed", "embedded", "faiss", "recall_at_10"):
        value = getattr(report, key)
        table.add_row(key, "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    table.add_row("skipped", str(len(report.skipped)))
    table.add_row("seconds", f"{report.seconds:.1f}")
    console.print(table)
    for rel, reason in report.skipped[:20]:
        console.print(f"  skipped {rel}: {reason}", highlight=False, markup=False)
    if len(report.skipped) > 20:
        console.print(f"  ... {len(report.skipped) - 20} more (listed in the index's skipped table)")


@app.command()
def search(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder made by `cliplab index`"),
    query: List[str] = typer.Argument(None, help='text and/or image files, combined with + and -, e.g. '
                                                 '"beach" + me.jpg - "people"; id:N is an indexed image'),
    k: int = typer.Option(10, "-k", help="number of results"),
    image: List[Path] = typer.Option([], "--image", help="an image query (added to the text)"),
    json_out: bool = typer.Option(False, "--json", help="print results as JSON"),
    device: str = typer.Option("cpu"),
) -> None:
    """Search an index by text, image or both (rclip-style + and - combinations)."""
    import json as _json

    from cliplab.models.factory import load_model
    from cliplab.serve.index import PhotoIndex
    from cliplab.serve.query import QueryEncoder, parse_cli_query

    if k < 1:
        raise CliplabError("-k must be >= 1")
    idx = PhotoIndex(index_dir)
    terms = parse_cli_query(list(query or []) + [str(p) for p in image])
    for p in image:
        if not p.is_file():
            raise CliplabError(f"image not found: {p}")
    model = load_model(idx.info["model"], device=device)
    if model.fingerprint() != idx.info["model_fingerprint"]:
        raise CliplabError(f"{idx.info['model']!r} is not the model {index_dir} was built with; rebuild the index")
    vector, used = QueryEncoder(model).compose(terms, idx)
    hits = idx.search(vector, k, exclude=used)
    if json_out:
        print(_json.dumps([{"rank": r, "id": h["id"], "score": h["score"], "path": h["path"],
                            "file": str(idx.roots[h["root"]] / h["path"]), "width": h["width"], "height": h["height"],
                            "captions": h["captions"]} for r, h in enumerate(hits, 1)]))
        return
    table = Table(title=f"{' '.join(query or [])} ({len(idx)} images)")
    for h in ("rank", "score", "path"):
        table.add_column(h, justify="right" if h != "path" else "left")
    for r, h in enumerate(hits, 1):
        table.add_row(str(r), f"{h['score']:.4f}", str(idx.roots[h["root"]] / h["path"]))
    console.print(table)


@app.command()
def serve(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder made by `cliplab index`"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default; any other needs --token)"),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="CLIPLAB_TOKEN",
                                        help="require this bearer token (16+ characters; a session cookie after)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve off loopback without a token (anyone who can "
                                                          "reach the address can search and download the images)"),
    allowed_host: List[str] = typer.Option([], "--allowed-host", help="another Host name clients use "
                                           "(repeatable; *.example.org patterns); loopback and --host always count"),
    max_upload_mb: float = typer.Option(10.0, help="largest accepted upload"),
    max_upload_mp: float = typer.Option(25.0, help="most megapixels decoded from a query image (JPEGs decode "
                                                   "reduced, so they may declare 4x this)"),
    max_k: int = typer.Option(200, help="largest number of results per query"),
    allow_urls: bool = typer.Option(False, help="let /knn-service fetch image_url from public addresses "
                                                "(off: the server fetches nothing)"),
    thumb_dir: Optional[Path] = typer.Option(None, help="thumbnail cache (default $CLIPLAB_CACHE/thumbs)"),
    device: str = typer.Option("cpu"),
) -> None:
    """Serve an index: web page at /, JSON API (/api/search, clip-retrieval's /knn-service), /docs, /metrics."""
    from cliplab.serve.app import ServerSettings, serve as run_server

    settings = ServerSettings(index_dir, token=token, host=host, allowed_hosts=allowed_host,
                              max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_upload_mp * 1e6),
                              max_k=max_k, allow_urls=allow_urls, thumb_dir=thumb_dir, device=device)
    run_server(settings, port=port, no_auth=no_auth, log=lambda m: console.print(m, highlight=False, markup=False))


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
    _check_plots_extra(plots)
    from cliplab.caption.train import CaptionRunConfig, evaluate_captioner, train_captioner

    extra = list(overrides) + ([f"data.path={data}"] if data else []) + \
        ([f"train.max_train_images={max_train_images}"] if max_train_images else []) + \
        ([f"data.cache_dir={cache_dir}"] if cache_dir else [])
    cfg = CaptionRunConfig.load(config).with_overrides(extra)
    out = _run_dir(run_dir, "caption")
    fit = train_captioner(cfg, out, resume=not fresh, log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(f"best dev epoch {fit['best_epoch']} (dev CIDEr-D {fit['best_dev_cider']:.1f}); training "
                  f"{fit['seconds']['train'] / 60:.1f} min", highlight=False)
    if evaluate:
        _print_caption_result(evaluate_captioner(out, plots=plots, log=console.print))
    console.print(f"run directory: {out}", soft_wrap=True)


def _print_caption_result(result: dict) -> None:
    keys = [("bleu1", "B-1"), ("bleu4", "B-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D"),
            ("clipscore", "CLIP-S*"), ("refclipscore", "RefCLIP-S*")]
    table = Table(title=f"captioning: {result['split']} ({result['n_images']} images, beam {result['beam']})")
    table.add_column("model")
    for _, h in keys:
        table.add_column(h, justify="right")
    for name, label in (("model", "captioner"), ("nearest_neighbour", "nearest neighbour")):
        table.add_row(label, *["n/a" if result[name].get(k) is None else f"{result[name][k]:.2f}" for k, _ in keys])
    console.print(table)
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
    _check_plots_extra(plots)
    from cliplab.caption.train import evaluate_captioner

    _check_choices("--tokenizer", [tokenizer], ("ptb", "simple"))
    _check_choices("--split", [split], ("test", "dev"))
    if rerank_k is not None and rerank_k < 0:
        raise CliplabError("--rerank-k must be >= 0")
    out_name = "captions.json" if split == "test" else f"captions_{split}.json"  # dev scoring never hides the test
    result = evaluate_captioner(run, split=split, beam=beam, tokenizer=tokenizer, device=device, plots=plots,
                                clipscore_model=clipscore_model, reuse_captions=reuse_captions, out_name=out_name,
                                rerank_k=rerank_k)
    _print_caption_result(result)
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
    device: str = DeviceOpt,
) -> None:
    """Caption image files with a trained captioner."""
    import json as _json

    import numpy as np

    from cliplab.caption.model import Captioner
    from cliplab.caption.train import DecodeConfig
    from cliplab.caption.visual import GridTower, caption_image_tower, tower_weights_id
    from cliplab.data.images import load_rgb
    from cliplab.utils import resolve_device

    for p in images:
        if not p.is_file():
            raise CliplabError(f"image not found: {p}")
    if beam < 1:
        raise CliplabError("--beam must be >= 1")
    if rerank_k < 0:
        raise CliplabError("--rerank-k must be >= 0")
    pil = [load_rgb(p) for p in images]  # bad files fail here, before the model loads
    dev = resolve_device(device)
    model = Captioner.load(run).to(dev)
    tower = caption_image_tower(model.config.image, model.config.image_model)
    if model.image_weights and tower_weights_id(tower) != model.image_weights:
        raise CliplabError(f"{run}: its image tower ({model.config.image_model or model.config.image['arch']}) now "
                           "has other weights than the captioner was trained with")
    grid_tower = GridTower(tower, model.config.grid)
    tf = tower.transform()
    import torch

    with torch.inference_mode():
        x = torch.stack([tf(im) for im in pil])
        grid = grid_tower(x).reshape(len(pil), model.config.grid ** 2, -1).numpy()
        pooled = tower(x).numpy()
    from cliplab.caption.train import CaptionSplit, generate_captions
    from cliplab.data.captions import CaptionDataset

    ds = CaptionDataset(Path("/"), [str(p) for p in images], [], np.zeros(0, dtype=np.int64))
    train = None
    if rerank_k:  # the consensus comes from the run's training split (features cached or in its bundle)
        from cliplab import rundir
        from cliplab.caption.train import CaptionRunConfig, load_split
        from cliplab.embed.cache import FeatureCache

        run_dir = run.parent if run.name == "best" else run
        if not (run_dir / rundir.CONFIG).is_file():
            raise CliplabError(f"--rerank-k needs the run folder (with {rundir.CONFIG}), not {run}")
        cfg = CaptionRunConfig.from_run(run_dir)
        train = load_split(cfg, cfg.data.train_split, FeatureCache(cfg.data.cache_dir), dev, progress=False,
                           image_tower=tower)
    caps = generate_captions(model, CaptionSplit(ds, grid, pooled), DecodeConfig(beam=beam,
                             max_new_tokens=max_new_tokens, rerank_k=rerank_k), dev, train=train)
    if json_out:
        print(_json.dumps([{"image": str(p), "caption": caps[str(p)]} for p in images]))
        return
    for p in images:
        console.print(f"{p}: {caps[str(p)]}", highlight=False, markup=False)


@app.command()
def models(
    measure: bool = typer.Option(False, help="time each installed tower on this machine (cached per machine)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The offline tower zoo: sizes, whether the weights are installed, speed measured here."""
    import json as _json

    from cliplab.models.zoo import catalog_dicts

    rows = catalog_dicts(measure)
    if json_out:
        print(_json.dumps(rows))
        return
    table = Table(title="towers and decoders")
    for h in ("name", "kind", "output", "input", "parameters", "installed", "speed here", "source / note"):
        table.add_column(h)
    for r in rows:
        speed = f"{r['speed']:.0f} {r['speed_unit']}" if r["speed"] else ("run --measure" if r["installed"] and
                                                                          r["kind"] != "decoder" else "")
        table.add_row(r["name"], r["kind"], str(r["output_dim"] or ""), r["input"],
                      f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else "", "yes" if r["installed"] else "no",
                      speed, r["note"] or r["source"])
    console.print(table)


@app.command()
def interpolate(
    initial: str = typer.Argument(..., help="the initial / zero-shot model (run or model folder, clip:SPEC)"),
    finetuned: str = typer.Argument(..., help="the fine-tuned model"),
    alpha: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma-separated weights of the "
                                                                            "fine-tuned model"),
    data: str = typer.Option(DEFAULT_DATA, help="in-domain caption dataset (its --split is evaluated)"),
    split: str = typer.Option("test"),
    classify: Optional[str] = typer.Option(None, help="out-of-domain labelled set for zero-shot accuracy"),
    classify_split: str = typer.Option("test", help="its split (choose alpha on another one, e.g. train, then "
                                                    "report test once)"),
    classify_limit: int = typer.Option(2000, help="images of it used (a fixed random subset)"),
    captions2: Optional[str] = typer.Option(None, help="out-of-domain caption set (all its images)"),
    space: str = typer.Option("weights", help="weights: WiSE-FT weight mixes (one architecture); outputs: "
                                              "score ensembles (1-alpha)*A + alpha*B of any two models"),
    run_dir: Optional[Path] = RunDirOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    plots: bool = PlotsOpt,
) -> None:
    """WiSE-FT: evaluate weight interpolations (or score ensembles) of two models in and out of domain."""
    _check_plots_extra(plots)
    from cliplab.train.wise import interpolate_run, wise_markdown
    from cliplab.utils import resolve_device

    try:
        alphas = [float(a) for a in alpha.split(",") if a.strip()]
    except ValueError:
        raise CliplabError(f"--alpha takes comma-separated numbers, not {alpha!r}") from None
    _check_choices("--space", [space], ("weights", "outputs"))
    out = _run_dir(run_dir, "wise")
    result = interpolate_run(initial, finetuned, alphas, data=data, split=split, classify=classify, space=space,
                             classify_split=classify_split, classify_limit=classify_limit, captions2=captions2,
                             cache_dir=cache_dir, device=resolve_device(device), run_dir=out, plots=plots,
                             log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(wise_markdown(result), highlight=False, markup=False)
    console.print(f"run directory: {out}", soft_wrap=True)


@app.command()
def ensemble(
    models: List[str] = typer.Argument(..., help="two or more models (run or model folders, conse, clip:SPEC)"),
    data: str = typer.Option(DEFAULT_DATA, help="caption dataset (--task retrieval) or labelled image set "
                                                "(--task zeroshot) whose --split chooses the weights"),
    task: str = typer.Option("retrieval", help="retrieval (caption retrieval) or zeroshot (classification)"),
    split: str = typer.Option("dev", help="the selection split (never the test split; e.g. train for a labelled "
                                          "set the members were not trained on)"),
    test: bool = typer.Option(False, "--test", help="evaluate the chosen ensemble on --test-split once, after"),
    test_split: str = typer.Option("test"),
    grid: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma-separated weight values tried "
                                                                               "per member (relative weights)"),
    metric: Optional[str] = typer.Option(None, help="metric to maximise: a retrieval metric (default rsum) or "
                                                    "accuracy / top5 / macro_f1 for zeroshot (default accuracy)"),
    templates: str = typer.Option("clip80", help="--task zeroshot: prompt variant"),
    flip_tta: bool = typer.Option(False, "--flip-tta", help="embed each image averaged with its mirror (recorded "
                                                            "in the folder: applies wherever it is used)"),
    image_root: Optional[Path] = typer.Option(None),
    run_dir: Optional[Path] = typer.Option(None, help="the ensemble folder to write (a loadable model)"),
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
) -> None:
    """Choose score-ensemble weights of several models on dev data; writes a model folder (ensemble.json)."""
    from cliplab.train.ensemble import choose_ensemble
    from cliplab.utils import resolve_device

    _check_choices("--task", [task], ("retrieval", "zeroshot"))
    try:
        values = [float(g) for g in grid.split(",") if g.strip()]
    except ValueError:
        raise CliplabError(f"--grid takes comma-separated numbers, not {grid!r}") from None
    out = _run_dir(run_dir, "ensemble")
    result = choose_ensemble(models, data=data, split=split, test=test, test_split=test_split, grid=values,
                             metric=metric, flip_tta=flip_tta, task=task, templates=templates,
                             image_root=str(image_root) if image_root else None, cache_dir=cache_dir,
                             device=resolve_device(device), run_dir=out,
                             log=lambda m: console.print(m, highlight=False, markup=False))
    if result["test"] and task == "retrieval":
        _print_retrieval({"ensemble": result["test"]}, f"retrieval: {data} ({test_split}), weights chosen on {split}")
    elif result["test"]:
        t = result["test"]
        top5 = f", top-5 {t['top5']:.2f}" if "top5" in t else ""
        console.print(f"zero-shot on {data} ({test_split}), weights chosen on {split}: accuracy {t['accuracy']:.2f}"
                      f"{top5}, macro-F1 {t['macro_f1']:.2f}", highlight=False)
    console.print(f"ensemble model folder: {out} (use it as -m {out})", soft_wrap=True)


@app.command("configs")
def configs_command() -> None:
    """List the example configs shipped with cliplab (use a name with -c, e.g. -c flickr8k_heads)."""
    from cliplab.configs import describe, packaged_configs

    table = Table(title="packaged configs")
    for h in ("name", "kind", "what it is"):
        table.add_column(h)
    for name, path in packaged_configs().items():
        kind = "sweep" if name.startswith("sweep") else "run"
        table.add_row(name, kind, describe(path))
    console.print(table)


def _version_callback(value: bool) -> None:
    if value:
        from cliplab import __version__

        info = rundir.provenance()
        commit = f" (git {info['git_commit'][:12]}{', modified' if info.get('git_dirty') else ''})" \
            if "git_commit" in info else ""
        console.print(f"cliplab {__version__}{commit}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error (or set "
                                                             "CLIPLAB_DEBUG=1); without it: one line, exit 1")) -> None:
    """Learn and evaluate shared image-text embedding spaces."""  # --debug is acted on by main()


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point; ``argv`` (default ``sys.argv[1:]``) lets tests run commands in-process.

    A user error (:class:`CliplabError`) prints one line and exits 2; any other exception prints one line
    ``error: Type: message`` and exits 1, with its traceback too under ``--debug`` or ``CLIPLAB_DEBUG=1``.
    """
    import itertools
    import os
    import traceback

    from rich.markup import escape

    leading = itertools.takewhile(lambda a: a.startswith("-"), sys.argv[1:] if argv is None else argv)
    debug = "--debug" in leading or os.environ.get("CLIPLAB_DEBUG", "").strip() not in ("", "0")
    try:
        app(args=argv, prog_name="cliplab")
    except CliplabError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # a bug or an environment problem, not the user's input
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        hint = "" if debug else " (run with --debug for the traceback)"
        console.print(f"[red]error:[/red] {escape(type(exc).__name__)}{': ' if message else ''}{escape(message)}"
                      f"{hint}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
