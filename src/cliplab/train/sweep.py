"""Experiment runner: a grid over any config keys, run one after another on cached features.

Sweep file (YAML)::

    base: configs/flickr8k_heads.yaml       # a run config (path relative to this file), optional
    set: {train.epochs: 20}                 # overrides applied to every run, optional
    grid:                                   # every combination is one run
      train.lr: [1.0e-4, 1.0e-5, 1.0e-6]
      train.loss: [infonce, triplet]
    vary:                                   # or: one factor at a time around the base run
      train.lr: [1.0e-5, 1.0e-6]
      train.trainable: [image_head, text_head]

Writes ``results.csv`` + ``results.md`` (one row per run: its settings, best dev epoch, its dev score,
test recalls) and ``curves.csv`` (per run and epoch: train loss, dev and test R@1) next to one folder per
run, and ``selected.json``: the run with the best dev score (``train.select_metric``) — the one to
report. A finished run is skipped when the sweep is started again; an interrupted one resumes; a run
folder left by a different config is refused (naming the changed keys) unless ``fresh``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from cliplab import rundir
from cliplab.config import check_section, load_section
from cliplab.errors import ConfigError
from cliplab.eval.tables import markdown_table
from cliplab.rundir import CURVES, SWEEP, SWEEP_RESULTS, read_metrics
from cliplab.train.config import RunConfig
from cliplab.train.run import train_run
from cliplab.utils import write_json, write_text


@dataclass
class SweepConfig:
    """A sweep file: a ``base`` run config (a path relative to the sweep file, or a packaged name), ``set``
    overrides for every run, and exactly one of ``grid`` (every combination) or ``vary`` (one factor at a
    time), each mapping config keys to lists of values."""

    base: str | None = None
    set: dict = field(default_factory=dict)
    grid: dict | None = None
    vary: dict | None = None

    def __post_init__(self) -> None:
        check_section(self, "sweep")
        if (self.grid is None) == (self.vary is None):
            raise ConfigError("give exactly one of 'grid' (all combinations) or 'vary' (one factor at a time)")
        values = getattr(self, self.kind)
        if not values or not all(isinstance(v, list) and v for v in values.values()):
            raise ConfigError(f"sweep.{self.kind} must map config keys to non-empty lists")

    @property
    def kind(self) -> str:
        return "grid" if self.grid is not None else "vary"


def load_sweep(path: str | Path) -> tuple[RunConfig, dict[str, list], list[str], str]:
    """A sweep file (path or packaged name) through the one config loader; returns the base run config, the
    grid (or vary) mapping, the ``set`` overrides and the kind (``grid`` or ``vary``)."""
    from cliplab.configs import read_yaml_config, resolve_config

    path = resolve_config(path)
    try:
        sweep = load_section(SweepConfig, read_yaml_config(path), "sweep")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = RunConfig()
    if sweep.base:
        base_path = Path(sweep.base)
        if not base_path.is_absolute() and (path.parent / base_path).is_file():
            base_path = path.parent / base_path
        base = RunConfig.load(base_path)
    fixed = [f"{k}={json.dumps(v)}" for k, v in sweep.set.items()]
    return base, getattr(sweep, sweep.kind), fixed, sweep.kind


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            raise ConfigError(f"sweep key {dotted!r}: unknown config key")
        d = d[part]
    return d


def sweep_settings(base: RunConfig, grid: dict[str, list], kind: str) -> list[dict]:
    """Every combination (grid), or the base run plus each value of each key changed alone (vary)."""
    keys = list(grid)
    if kind == "grid":
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    defaults = {k: _get(base.to_dict(), k) for k in keys}
    runs = [dict(defaults)]
    for k in keys:
        runs += [{**defaults, k: v} for v in grid[k] if v != defaults[k]]
    return runs


def run_name(settings: dict) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in settings.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def _vary_name(settings: dict, defaults: dict) -> str:
    changed = {k: v for k, v in settings.items() if v != defaults[k]}
    return run_name(changed) if changed else "base"


def run_sweep(sweep_file: str | Path, out_dir: str | Path, *, progress: bool = True, log=print,
              fresh: bool = False, test: str = "all") -> list[dict]:
    """Run every setting (skipping finished ones); ``fresh`` starts runs over instead of resuming them.
    ``test="selected"`` evaluates the test split only for the run the dev split selects (once, at the end);
    ``"all"`` tracks test for every run (for studies of training behaviour; selection is still on dev)."""
    if test not in ("all", "selected"):
        raise ConfigError(f"sweep test must be all or selected, not {test!r}")
    base, grid, fixed, kind = load_sweep(sweep_file)
    out_dir = Path(out_dir)
    base = base.with_overrides(fixed) if fixed else base
    combos = sweep_settings(base, grid, kind)
    configs = [(s, base.with_overrides([f"{k}={json.dumps(v)}" for k, v in s.items()])) for s in combos]
    names = [run_name(s) if kind == "grid" else _vary_name(s, combos[0]) for s in combos]
    evaluator, metric = base.train.evaluator_class, base.train.select_metric
    direction = evaluator.direction(metric)
    rundir.claim_run_folder(out_dir, "sweep", "--out-dir")  # a folder of the user's is refused before any work
    with rundir.run_lock(out_dir, "cliplab sweep"):
        write_json(out_dir / SWEEP, {"base": base.to_dict(), kind: grid, "runs": names, "select_metric": metric})
        rows, curves = [], []
        for i, ((settings, cfg), name) in enumerate(zip(configs, names), 1):
            run_dir = out_dir / name
            log(f"[{i}/{len(configs)}] {name}")
            done = run_dir / rundir.RESULTS
            if (not fresh and done.is_file() and _same_config(run_dir, cfg)
                    and (test == "selected" or rundir.read_json(done)["test"])):
                results = rundir.read_json(done)
            else:
                results = train_run(cfg, run_dir, resume=not fresh, progress=progress, log=log,
                                    track_test=test == "all", evaluate_test=test == "all")
            rows.append(_row(name, settings, results, metric, evaluator))
            for rec in read_metrics(run_dir):
                curves.append({"run": name, "epoch": rec["epoch"], "train_loss": rec["train_loss"],
                               "dev_t2i_r1": rec.get("dev", {}).get("t2i_r1"),
                               "dev_i2t_r1": rec.get("dev", {}).get("i2t_r1"),
                               "test_t2i_r1": rec.get("test", {}).get("t2i_r1"),
                               "test_i2t_r1": rec.get("test", {}).get("i2t_r1")})
            _write_tables(out_dir, rows, curves)
        i = evaluator.best([r[f"dev_{metric}"] for r in rows], metric)  # the first of equals
        pick, (settings, cfg) = rows[i], configs[i]
        log(f"selected by dev {metric}: {pick['run']} ({pick[f'dev_{metric}']})")
        results = rundir.read_json(out_dir / pick["run"] / rundir.RESULTS)
        if not results["test"]:  # the one test evaluation of the study
            results = train_run(cfg, out_dir / pick["run"], resume=True, progress=progress, log=log)
            rows[i] = {**_row(pick["run"], settings, results, metric, evaluator),
                       "train_seconds": pick["train_seconds"]}
            _write_tables(out_dir, rows, curves)
        write_json(out_dir / rundir.SWEEP_SELECTED, {
            "run": pick["run"], "settings": settings, "select_metric": metric, "direction": direction,
            f"dev_{metric}": pick[f"dev_{metric}"], "test": results["test"].get("trained"),
            "baselines": {k: v for k, v in results["test"].items() if k != "trained"},
            "protocol": f"chosen by best dev {metric} over {len(rows)} runs; test evaluated "
                        + ("for every run (study mode)" if test == "all" else "for this run only, once")})
    return rows


def _same_config(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` was trained with ``cfg`` (a config written before a setting existed reads with
    its default)."""
    if not (run_dir / rundir.CONFIG).is_file():
        return False
    saved = rundir.read_json(run_dir / rundir.CONFIG)
    try:
        return saved == cfg.to_dict() or RunConfig.from_dict(saved).to_dict() == cfg.to_dict()
    except ConfigError:
        return False


def _row(name: str, settings: dict, results: dict, metric: str, evaluator) -> dict:
    """A results row: the settings, the selection, the evaluator's brief dev columns and test retrieval."""
    row = {"run": name, **settings, "best_epoch": results["fit"]["best_epoch"],
           f"dev_{metric}": round(results["fit"][f"best_dev_{metric}"], 2)}
    dev = results.get("dev", {}).get("trained")
    if dev:
        row.update({f"dev_{k}": round(dev[k], 2) for k in evaluator.brief if k in dev})
    test = results["test"].get("trained")
    if test:
        row.update({"test_t2i_r1": round(test["t2i_r1"], 2), "test_i2t_r1": round(test["i2t_r1"], 2),
                    "test_t2i_r5": round(test["t2i_r5"], 2), "test_i2t_r5": round(test["i2t_r5"], 2),
                    "test_rsum": round(test["rsum"], 1)})
    return {**row, "train_seconds": round(results["seconds"]["train"], 1)}


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_tables(out_dir: Path, rows: list[dict], curves: list[dict]) -> None:
    write_text(out_dir / SWEEP_RESULTS, _csv(rows))
    write_text(out_dir / CURVES, _csv(curves))
    header = list(dict.fromkeys(k for r in rows for k in r))
    write_text(out_dir / rundir.RESULTS_MD, markdown_table(header, [[str(r.get(h, "")) for h in header] for r in rows]))
