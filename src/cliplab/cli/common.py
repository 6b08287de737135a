"""What every command shares: the typer apps, the console, common options and the table printers."""

from __future__ import annotations

import functools
import inspect
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from cliplab.errors import CliplabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learn and evaluate shared image-text embedding spaces.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models: retrieval, zero-shot classification, probes.")
app.add_typer(eval_app, name="eval")
caption_app = typer.Typer(no_args_is_help=True, help="Caption images with a tuned pretrained language model.")
app.add_typer(caption_app, name="caption")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get whole tables
DEFAULT_DATA = "../shared/data/flickr8k"

OnErrorOpt = typer.Option(None, "--on-error", help="raise (default) or skip bad images/captions and count them")
CacheOpt = typer.Option(None, "--cache-dir", help="feature cache folder (default $CLIPLAB_CACHE or ~/.cache/cliplab)")
SetOpt = typer.Option([], "--set", "-s", help="config override KEY=VALUE, e.g. train.lr=3e-4 (repeatable)")
PlotsOpt = typer.Option(False, "--plots", help="also write the figures (PNG + data) to RUN_DIR/plots/")
RunDirOpt = typer.Option(None, "--run-dir", help="run folder to write (default runs/KIND-TIMESTAMP)")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda")
SeedOpt = typer.Option(0, "--seed")
BackendOpt = typer.Option("auto", help="frozen-tower inference: auto (ONNX Runtime on CPU, torch on CUDA), "
                                       "torch, onnx or onnx-int8 (quantised, changes results)")
ClassesOpt = typer.Option(None, "--classes", help="file with one class name per line (fixes names and order)")
RenameOpt = typer.Option([], "--rename", help="rename a class for prompts, OLD=NEW (repeatable)")

# options several commands take, added to a command's signature by :func:`with_options`
SHARED_OPTIONS: dict[str, tuple[object, object]] = {
    "classes": (Optional[Path], ClassesOpt),
    "rename": (List[str], RenameOpt),
    "run_dir": (Optional[Path], RunDirOpt),
    "cache_dir": (Optional[Path], CacheOpt),
    "device": (str, DeviceOpt),
    "seed": (int, SeedOpt),
    "plots": (bool, PlotsOpt),
}


def with_options(*names: str) -> Callable:
    """Add the named :data:`SHARED_OPTIONS` to a command, which receives them in ``**options``."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=SHARED_OPTIONS[n][1],
                                    annotation=SHARED_OPTIONS[n][0]) for n in names]

        @functools.wraps(command)
        def run(*args, **kwargs):
            return command(*args, **kwargs)

        run.__signature__ = signature.replace(parameters=own + shared)
        run.__annotations__ = {p.name: p.annotation for p in own + shared}
        del run.__wrapped__  # typer reads the signature and annotations set here
        return run

    return decorate


def run_dir_for(run_dir: Optional[Path], prefix: str) -> Path:
    """The run folder to write: the given one, else ``runs/PREFIX-TIMESTAMP``."""
    return run_dir or Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def log_line(message: str) -> None:
    """Progress lines from library calls, printed as they are (no rich markup)."""
    console.print(message, highlight=False, markup=False)


def check_plots_extra(plots: bool) -> None:
    """``--plots`` needs the ``viz`` extra: say so before any work, not after training."""
    if plots:
        from cliplab.extras import require

        require("matplotlib", "--plots")


def check_choices(option: str, values, choices) -> None:
    for v in values:
        if v not in choices:
            raise CliplabError(f"{option} must be one of {', '.join(choices)}, not {v!r}")


def parse_numbers(option: str, text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``; anything else is a one-line error naming the option."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliplabError(f"{option} takes comma-separated numbers, not {text!r}") from None


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str, left: Sequence[str] = ()) -> None:
    """A table: the columns named in ``left`` (default: the first) left-aligned, the rest right-aligned."""
    left = set(left) or {header[0]}
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in left else "right")
    for row in rows:
        table.add_row(*[str(x) for x in row])
    console.print(table)


def print_retrieval(results: dict[str, dict[str, float]], title: str) -> None:
    from cliplab.eval.tables import retrieval_rows

    print_table(*retrieval_rows(results), title=title)


def print_skips(report) -> None:
    if len(report):
        console.print(f"[yellow]{report.summary()}[/yellow]")
        for kind, msg in report.items[:20]:
            console.print(f"  - {kind}: {msg}", highlight=False, markup=False)


def print_run_dir(path) -> None:
    console.print(f"run directory: {path}", soft_wrap=True)


def load_run_config(config: Optional[str | Path], data: Optional[str], on_error: Optional[str],
                    cache_dir: Optional[Path], overrides: Sequence[str]):
    """A training run's config (a packaged name or YAML path, else the defaults) with the command's overrides."""
    from cliplab.train.config import RunConfig

    cfg = RunConfig.load(config) if config else RunConfig()
    extra = list(overrides)
    if data:
        extra.append(f"data.path={data}")
    if on_error:
        extra.append(f"data.on_error={on_error}")
    if cache_dir:
        extra.append(f"data.cache_dir={cache_dir}")
    return cfg.with_overrides(extra) if extra else cfg
