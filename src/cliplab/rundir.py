"""The run-directory layout: file names, what each kind of run writes, and reading it back.

Bottom layer (imports only ``utils`` and ``errors``): train, sweep, eval, the CLI, viz and the report all
name run files through this module, so a file name or JSON field lives in one place.

Kinds of run folder and the file that identifies each:

=========  ==========================================  =========================================
kind       written by                                  identifying files
=========  ==========================================  =========================================
train      ``cliplab train`` / ``demo``                ``results.json`` + ``metrics.jsonl``
eval       ``cliplab eval retrieval``                  ``metrics.json``
zeroshot   ``cliplab zeroshot``                        ``zeroshot.json``
probe      ``cliplab probe``                           ``probe.json``
sweep      ``cliplab sweep``                           ``results.csv`` + ``curves.csv``
embed      ``cliplab embed``                           ``embed.json``
wise       ``cliplab interpolate``                     ``wise.json``
caption    ``cliplab caption eval``                    ``captions.json``
ensemble   ``cliplab ensemble``                        ``ensemble.json`` (also a model folder)
=========  ==========================================  =========================================
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError
from cliplab.utils import write_text

CONFIG = "config.json"  # the settings a run was started with
RESULTS = "results.json"  # final numbers of a training run
RESULTS_MD = "results.md"  # the same as a readable table (every kind of run)
METRICS = "metrics.jsonl"  # one JSON record per training epoch
CHECKPOINT = "last.pt"  # resumable training state (model, optimiser, RNG, config digest)
BEST = "best"  # the dev-selected model (a model folder)
TENSORBOARD = "tensorboard"
PLOTS = "plots"  # figures (PNG + their data)
EVAL_METRICS = "metrics.json"  # ``eval retrieval``: model -> metrics
ZEROSHOT = "zeroshot.json"
PROBE = "probe.json"
EMBED = "embed.json"
SWEEP = "sweep.json"  # the expanded sweep definition
SWEEP_RESULTS = "results.csv"  # one row per sweep run
CURVES = "curves.csv"  # per sweep run and epoch
WISE = "wise.json"  # ``cliplab interpolate``: metrics per interpolation weight
CAPTIONS = "captions.json"  # ``cliplab caption eval``: generated captions and their metrics
ENSEMBLE = "ensemble.json"  # ``cliplab ensemble``: member models, dev-chosen weights (a loadable model folder)


def read_json(path: str | Path) -> Any:
    """JSON from a run file; a missing or damaged file is a one-line error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None


def run_kind(run_dir: str | Path) -> str:
    """Which kind of run a folder holds (see the module docstring)."""
    d = Path(run_dir)
    if (d / RESULTS).is_file() and (d / METRICS).is_file():
        return "train"
    if (d / CAPTIONS).is_file():
        return "caption"
    for name, kind in ((EVAL_METRICS, "eval"), (ZEROSHOT, "zeroshot"), (PROBE, "probe"), (WISE, "wise"),
                       (ENSEMBLE, "ensemble")):
        if (d / name).is_file():
            return kind
    if (d / SWEEP_RESULTS).is_file() and (d / CURVES).is_file():
        return "sweep"
    if (d / EMBED).is_file():
        return "embed"
    raise ConfigError(f"{d}: not a cliplab run folder (no {RESULTS}, {EVAL_METRICS}, {ZEROSHOT}, {PROBE}, "
                      f"{ENSEMBLE} or sweep {SWEEP_RESULTS})")


# -- training runs
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a training run (empty when it has not finished an epoch).

    An unreadable *last* line is left out: a run killed while appending a record leaves it half written
    (resuming rewrites the file without it, see :func:`truncate_metrics`). A damaged line before the last
    is an error naming the file and line.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [(n, ln) for n, ln in enumerate(path.read_bytes().split(b"\n"), 1) if ln.strip()]
    records = []
    for i, (n, ln) in enumerate(lines):
        try:
            record = json.loads(ln.decode("utf-8"))
            problem = "" if isinstance(record, dict) else f"a JSON {type(record).__name__}, not a record"
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = str(exc)
        if problem and i == len(lines) - 1:
            break
        if problem:
            raise ConfigError(f"{path}:{n}: damaged metrics record ({problem}); pass --fresh to start the run over")
        records.append(record)
    return records


def training_seconds(run_dir: str | Path) -> float:
    """Wall-clock seconds of every recorded epoch of a run, across resumes (dev evaluation included)."""
    return float(sum(r.get("epoch_seconds", 0.0) for r in read_metrics(run_dir)))


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: str | Path, last_epoch: int) -> None:
    """Drop records after ``last_epoch`` (written after the checkpoint a resumed run starts from) and a
    half-written last line; the file is replaced atomically."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        keep = [r for r in read_metrics(run_dir) if r["epoch"] <= last_epoch]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def best_epoch(run_dir: str | Path) -> int | None:
    """The dev-selected epoch of a finished training run, or None."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    return read_json(path).get("fit", {}).get("best_epoch")


def model_dir(path: str | Path) -> Path:
    """A run folder's ``best/`` model, or the path itself when it is a model folder."""
    path = Path(path)
    return path / BEST if (path / BEST).is_dir() else path


# -- resuming: a run continues only with the settings it was started with
def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists and values as leaves; JSON-normalised)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two training records (``key: old -> new``)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in keys
            if saved.get(k, "(unset)") != current.get(k, "(unset)")]


def check_resume_config(run_dir: str | Path, saved: dict | None, current: dict) -> None:
    """Refuse to resume a checkpoint made with other settings (naming the changed keys)."""
    if saved is None:
        raise ConfigError(f"{Path(run_dir) / CHECKPOINT} records no config (made by an older cliplab); "
                          "pass --fresh to start the run over")
    changes = config_changes(saved, current)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; +{len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(f"{run_dir} holds a run started with another config ({shown}); resume it with the "
                          "same settings, pass --fresh to start over, or use another --run-dir")


# -- sweeps
def read_csv_rows(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- provenance
def provenance() -> dict:
    """What produced a result: the cliplab version, and the git commit when running from a checkout."""
    from cliplab import __version__

    out: dict[str, Any] = {"cliplab": __version__}
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5,
                                env={**os.environ, "GIT_DIR": str(src.parents[1] / ".git")})
        if commit.returncode == 0 and (src.parents[1] / ".git").exists():
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src.parents[1],
                                   capture_output=True, text=True, timeout=5)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def caption_results(split: str) -> str:
    """The file ``cliplab caption eval`` writes for a split: ``captions.json`` (test) or ``captions_SPLIT.json``
    (scoring dev never replaces the test captions)."""
    return CAPTIONS if split == "test" else f"captions_{split}.json"
