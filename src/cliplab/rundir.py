"""The run-directory layout: file names, the kinds of run folder, and reading them back.

Bottom layer (imports only ``utils`` and ``errors``): train, sweep, eval, the CLI, viz and the report all
name run files through this module, so a file name or JSON field lives in one place. Each kind of run folder
is one :class:`RunKind` record in :data:`RUN_KINDS` (its identifying files, its JSON record, the command that
writes it); :func:`run_kind` recognises a folder by them and the report draws any kind from its record (a kind
with a figure or table of its own registers a section in ``viz.report``). A new kind of run is one
:func:`register_run_kind` call beside the code that writes it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError, DataError
from cliplab.utils import (exclusive_lock, marked_folder_state, read_json_or_none, temp_name_pattern, write_json,
                           write_text)

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
SEARCH_QUALITY = "search_quality.json"  # ``cliplab eval search``: metrics, cutoff, per-query table
SWEEP = "sweep.json"  # the expanded sweep definition
SWEEP_RESULTS = "results.csv"  # one row per sweep run
SWEEP_SELECTED = "selected.json"  # the sweep run the dev split selects (and its test numbers, once)
CURVES = "curves.csv"  # per sweep run and epoch
WISE = "wise.json"  # ``cliplab interpolate``: metrics per interpolation weight
CAPTIONS = "captions.json"  # ``cliplab caption eval``: generated captions and their metrics (test split)
CAPTION_FIT = "fit.json"  # ``cliplab caption train``: the fit summary (best epoch, dev score, seconds)
ENSEMBLE = "ensemble.json"  # ``cliplab ensemble``: member models, dev-chosen weights (a loadable model folder)
RUN_MARKER = "CLIPLAB_RUN.json"  # cliplab's mark on a run folder it made: the only folders it writes runs into
RUN_LOCK = "CLIPLAB_RUN.lock"  # held (flock) by the one run writing a folder

# files of a model folder (a run's best/, an exported model)
MODEL_WEIGHTS = "model.safetensors"  # two-tower and tuned-CLIP weights
TWO_TOWER_CONFIG = "cliplab_config.json"
CLIP_CONFIG = "cliplab_clip.json"  # a tuned CLIP: its source and tuning
CAPTIONER_CONFIG = "cliplab_captioner.json"
CAPTIONER_WEIGHTS = "captioner.safetensors"

# figures in plots/: a name (the file's stem; ``{}`` filled in by plot_file) -> what it shows
PLOT_NAMES = {
    "curves": "training loss and dev (and tracked test) metrics per epoch, the selected epoch marked",
    "recall_at_k": "Recall@K for K = 1..50 both ways, one line per model",
    "map_{}": "images and captions of every model's space in 2-D (t-SNE or PCA)",
    "gallery_i2t": "image -> text: best successes and worst failures",
    "gallery_t2i": "text -> image: best successes and worst failures",
    "confusion_{}": "a confusion matrix (zero-shot, or a probe)",
    "zeroshot_top5": "top-5 class probabilities of sampled images",
    "map_classes_tsne": "test features by class, t-SNE",
    "overlay_{}": "a sweep's runs overlaid, one metric",
    "wise_tradeoff": "WiSE-FT: in- vs out-of-domain score per interpolation weight",
    "caption_gallery": "best and worst generated captions with their references",
    "attention_{}": "a caption's per-word attention over the image grid",
}


def plot_file(run_dir: str | Path, name: str, *fill: str) -> Path:
    """``run_dir/plots/NAME.png`` for a registered figure name (``map_{}`` filled with ``fill``)."""
    if name not in PLOT_NAMES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(PLOT_NAMES)}")
    return Path(run_dir) / PLOTS / (name.format(*fill) + ".png")


def caption_results(split: str) -> str:
    """The file ``cliplab caption eval`` writes for a split: ``captions.json`` (test) or ``captions_SPLIT.json``
    (scoring dev never replaces the test captions)."""
    return CAPTIONS if split == "test" else f"captions_{split}.json"


@dataclass(frozen=True)
class RunKind:
    """A kind of run folder: the files that identify it (all present), the first of which is its JSON (or CSV)
    record, and the command that writes it."""

    name: str
    files: tuple[str, ...]
    written_by: str

    @property
    def record(self) -> str:
        return self.files[0]

    def holds(self, run_dir: Path) -> bool:
        return all((run_dir / f).is_file() for f in self.files)

    def read(self, run_dir: str | Path) -> Any:
        """The folder's record: JSON as a dict, CSV as rows."""
        path = Path(run_dir) / self.record
        return read_csv_rows(path) if path.suffix == ".csv" else read_json(path)


RUN_KINDS: dict[str, RunKind] = {}  # recognised in this order


def register_run_kind(kind: RunKind) -> RunKind:
    RUN_KINDS[kind.name] = kind
    return kind


for _kind in (RunKind("train", (RESULTS, METRICS), "cliplab train / demo"),
              RunKind("caption", (CAPTIONS,), "cliplab caption eval"),
              RunKind("eval", (EVAL_METRICS,), "cliplab eval retrieval"),
              RunKind("zeroshot", (ZEROSHOT,), "cliplab eval zeroshot"),
              RunKind("probe", (PROBE,), "cliplab eval probe"),
              RunKind("wise", (WISE,), "cliplab interpolate"),
              RunKind("ensemble", (ENSEMBLE,), "cliplab ensemble (also a model folder)"),
              RunKind("sweep", (SWEEP_RESULTS, CURVES), "cliplab sweep"),
              RunKind("embed", (EMBED,), "cliplab embed"),
              RunKind("search", (SEARCH_QUALITY,), "cliplab eval search")):
    register_run_kind(_kind)


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
    """Which kind of run a folder holds (the first of :data:`RUN_KINDS` whose files are all there)."""
    d = Path(run_dir)
    for kind in RUN_KINDS.values():
        if kind.holds(d):
            return kind.name
    known = "; ".join(f"{k.name}: {' + '.join(k.files)}" for k in RUN_KINDS.values())
    raise ConfigError(f"{d}: not a cliplab run folder (none of the run records: {known})")


# -- a run folder is cliplab's own: made with a marker; a folder of the user's is never written into
def run_folder_state(run_dir: str | Path) -> str:
    """``missing``, ``empty``, ``run`` (has cliplab's marker), ``legacy`` (a run folder written before the
    marker, recognised by the content of its config or record) or ``foreign`` (anything else)."""
    own = lambda name: name == RUN_LOCK or _OWN_TEMP.fullmatch(name)  # noqa: E731 - a claim or run beside us
    state = marked_folder_state(run_dir, RUN_MARKER, "cliplab-run", own)
    if state is not None:
        return "run" if state == "marked" else state
    return "legacy" if _older_run(Path(run_dir)) else "foreign"


_OWN_TEMP = temp_name_pattern(re.escape(RUN_MARKER))  # a marker write cut short
# records of runs written before the marker: keys that only cliplab's records hold together
_LEGACY_RECORD_KEYS = {WISE: {"rows", "provenance"}, ENSEMBLE: {"members", "weights", "provenance"},
                       SEARCH_QUALITY: {"index", "mode", "metrics", "cutoff", "queries"}}


def _training_config(saved) -> bool:
    """A training run's settings as cliplab writes them (``RunConfig.to_dict()``)."""
    return isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("model", "data", "train")) \
        and {"image", "text"} <= set(saved["model"])


def _older_run(d: Path) -> bool:
    """A folder cliplab wrote before the marker: a ``config.json`` it wrote (every train, eval, zeroshot,
    probe, embed and caption run has one) or a record of the kinds without one (sweep, wise, ensemble,
    search). File names alone are not enough: other tools write ``metrics.json`` or ``results.csv`` too."""
    saved = read_json_or_none(d / CONFIG) if (d / CONFIG).is_file() else None
    if isinstance(saved, dict) and ("provenance" in saved or _training_config(saved)):
        return True
    sweep = read_json_or_none(d / SWEEP) if (d / SWEEP).is_file() else None
    if isinstance(sweep, dict) and "runs" in sweep and _training_config(sweep.get("base")):
        return True
    for name, keys in _LEGACY_RECORD_KEYS.items():
        record = read_json_or_none(d / name) if (d / name).is_file() else None
        if isinstance(record, dict) and keys <= set(record):
            return True
    return False


def check_run_folder(run_dir: str | Path, kind: str, option: str = "--run-dir") -> str:
    """Refuse (a one-line DataError) a folder that holds anything but a cliplab run of ``kind`` (a name of
    :data:`RUN_KINDS`: an eval never replaces a training run's files); writes nothing. Returns its state."""
    d = Path(run_dir)
    state = run_folder_state(d)
    if state == "foreign":
        what = "is not a folder" if d.exists() and not d.is_dir() else \
            f"is not empty and is not a cliplab run folder (no {RUN_MARKER})"
        raise DataError(f"{option} {d} {what}; nothing was written. Give a new or empty folder: cliplab writes "
                        "only into folders it made")
    held = _held_kind(d, state)
    if held is not None and held != kind:
        raise DataError(f"{option} {d} holds a cliplab {held} run ({RUN_KINDS[held].written_by}) and this command "
                        f"writes {kind} runs; nothing was written. Give a new or empty folder, so that its files "
                        "stay as they are")
    return state


def claim_run_folder(run_dir: str | Path, kind: str, option: str = "--run-dir") -> Path:
    """:func:`check_run_folder`, then create a new or empty folder with cliplab's marker, which records the
    kind (a marked folder without a kind gets it). Returns the folder."""
    d = Path(run_dir)
    if check_run_folder(d, kind, option) != "run" or _held_kind(d, "run") is None:
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / RUN_MARKER, {"format": "cliplab-run", "version": 1, "kind": kind,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "note": "written by cliplab: this folder holds a cliplab run and its files"})
    return d


def _held_kind(d: Path, state: str) -> str | None:
    """The kind of run a folder holds: its marker's, else (an older folder) the one its records show."""
    if state == "run":
        held = read_json_or_none(d / RUN_MARKER).get("kind")
        return held if held in RUN_KINDS else None
    if state == "legacy":
        try:
            return run_kind(d)
        except ConfigError:  # a run cut short before its record: any writer may finish it
            return None
    return None


def run_lock(run_dir: str | Path, command: str):
    """An exclusive lock on a run folder while ``command`` writes it (a second run into it is refused)."""
    return exclusive_lock(Path(run_dir) / RUN_LOCK, f"{run_dir} is being written by another cliplab process (it "
                          f"holds {RUN_LOCK}), so `{command}` did not start; wait for it to finish, or give another "
                          "run folder")


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
