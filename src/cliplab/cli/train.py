"""Training commands: ``train``, ``demo``, ``sweep``, ``interpolate`` (WiSE-FT) and ``ensemble``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cliplab import rundir
from cliplab.cli.common import (DEFAULT_DATA, CacheOpt, DeviceOpt, OnErrorOpt, PlotsOpt, RunDirOpt, SetOpt, app,
                                check_choices, check_plots_extra, console, load_run_config, log_line, parse_numbers,
                                print_retrieval, print_run_dir, print_table, run_dir_for)
from cliplab.errors import CliplabError


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
    check_plots_extra(plots)
    from cliplab.train.run import train_run

    cfg = load_run_config(config, data, on_error, cache_dir, overrides)
    out = run_dir_for(run_dir, "train")
    results = train_run(cfg, out, resume=not fresh, log=lambda m: console.print(m, highlight=False),
                        track_test=track_test, plots=plots)
    print_train_results(results, out)


def print_train_results(results: dict, out: Path) -> None:
    print_retrieval(results["test"], f"test retrieval ({results['data']['test']['name']})")
    fit = results["fit"]
    console.print(f"best dev epoch: {fit['best_epoch']}  features: {results['seconds']['features']:.0f}s  "
                  f"training: {results['seconds']['train']:.0f}s  total: {results['seconds']['total']:.0f}s"
                  f"{'  (features from cache)' if results['features_reused'] else ''}")
    if results["skipped_total"]:
        console.print(f"[yellow]skipped {results['skipped_total']} items[/yellow]")
        for split in results["skipped"].values():
            for kind, msg in split["items"][:20]:
                console.print(f"  - {kind}: {msg}", highlight=False, markup=False)
    print_run_dir(out)


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
    check_plots_extra(plots)
    from cliplab.configs import resolve_config
    from cliplab.train.run import train_run

    path = resolve_config(config)  # the packaged demo config by default; a missing one is an error, never defaults
    if not Path(data).exists():
        raise CliplabError(f"demo data not found: {data} (pass --data or DATA=... to make demo)")
    cfg = load_run_config(path, data, None, cache_dir, [])
    console.print(f"[bold]cliplab demo[/bold]: {data} -> {run_dir} (config {path.name})")
    results = train_run(cfg, run_dir, resume=False, log=lambda m: console.print(m, highlight=False), plots=plots)
    print_train_results(results, run_dir)


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
    check_plots_extra(plots)
    from cliplab.train.sweep import run_sweep

    out = out_dir or Path("runs") / f"sweep-{Path(sweep_file).stem}"
    rows = run_sweep(sweep_file, out, log=lambda m: console.print(m, highlight=False), fresh=fresh, test=test)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # the selected run adds its test columns
    print_table(columns, [[r.get(h, "") for h in columns] for r in rows], f"sweep: {Path(sweep_file).name}",
                left=columns)
    if plots:
        from cliplab.viz.runs import plot_sweep

        plot_sweep(out)
    console.print(f"tables: {out / rundir.RESULTS_MD}, {out / rundir.CURVES}", soft_wrap=True)


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
    check_plots_extra(plots)
    from cliplab.studies.wise import interpolate_run, wise_markdown
    from cliplab.utils import resolve_device

    alphas = parse_numbers("--alpha", alpha)
    check_choices("--space", [space], ("weights", "outputs"))
    out = run_dir_for(run_dir, "wise")
    result = interpolate_run(initial, finetuned, alphas, data=data, split=split, classify=classify, space=space,
                             classify_split=classify_split, classify_limit=classify_limit, captions2=captions2,
                             cache_dir=cache_dir, device=resolve_device(device), run_dir=out, plots=plots,
                             log=log_line)
    console.print(wise_markdown(result), highlight=False, markup=False)
    print_run_dir(out)


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
    from cliplab.studies.ensemble import choose_ensemble
    from cliplab.utils import resolve_device

    check_choices("--task", [task], ("retrieval", "zeroshot"))
    values = parse_numbers("--grid", grid)
    out = run_dir_for(run_dir, "ensemble")
    result = choose_ensemble(models, data=data, split=split, test=test, test_split=test_split, grid=values,
                             metric=metric, flip_tta=flip_tta, task=task, templates=templates,
                             image_root=str(image_root) if image_root else None, cache_dir=cache_dir,
                             device=resolve_device(device), run_dir=out, log=log_line)
    if result["test"] and task == "retrieval":
        print_retrieval({"ensemble": result["test"]}, f"retrieval: {data} ({test_split}), weights chosen on {split}")
    elif result["test"]:
        t = result["test"]
        top5 = f", top-5 {t['top5']:.2f}" if "top5" in t else ""
        console.print(f"zero-shot on {data} ({test_split}), weights chosen on {split}: accuracy {t['accuracy']:.2f}"
                      f"{top5}, macro-F1 {t['macro_f1']:.2f}", highlight=False)
    console.print(f"ensemble model folder: {out} (use it as -m {out})", soft_wrap=True)
