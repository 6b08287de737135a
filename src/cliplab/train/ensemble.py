"""Choose the weights of a score ensemble on dev data (``cliplab ensemble``).

Every member is embedded once on the selection split (member by member, features cached); the weights are then
found by greedy coordinate ascent on a grid: start from the best single member (weight 1), and in rounds try
every grid value for every member's weight, keeping a change only when the dev metric strictly improves, until a
round changes nothing. The result is a local optimum of the grid (no single weight change helps) that is at
least as good as the best member. Members left at weight 0 are dropped. The folder written is a model
(``load_model(folder)``); with ``test=True`` the chosen ensemble is evaluated on the test split once, after the
choice, and the selection split must share no image with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from cliplab import rundir
from cliplab.data.captions import check_disjoint_splits, load_caption_dataset
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import encode_dataset
from cliplab.errors import ConfigError
from cliplab.eval.retrieval import metric_direction, retrieval_metrics
from cliplab.models.ensemble import ensemble_member_spec, join_embeddings
from cliplab.models.factory import load_model, model_folder_kind
from cliplab.utils import write_json, write_text

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class WeightSearch:
    """The outcome of :func:`search_weights`: the chosen weights (normalised to sum 1) and the grid values they
    come from (``raw``), their score, and what was tried."""

    weights: tuple[float, ...]
    raw: tuple[float, ...]
    score: float
    evaluated: int
    rounds: int
    trace: list[dict] = field(default_factory=list)  # every accepted step: weights and score


def _key(weights: Sequence[float]) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(round(w / total, 9) for w in weights)


def search_weights(score: Callable[[tuple[float, ...]], float], n: int, grid: Sequence[float] = DEFAULT_GRID, *,
                   maximize: bool = True, max_rounds: int = 20) -> WeightSearch:
    """Greedy coordinate ascent over ``n`` non-negative weights on ``grid`` (see the module docstring); ``score``
    is called once per distinct normalised weight vector."""
    grid = sorted({float(g) for g in grid})
    if n < 1 or not grid or grid[0] < 0 or grid[-1] <= 0:
        raise ConfigError(f"ensemble weight grid must hold non-negative numbers, one of them > 0, not {grid}")
    seen: dict[tuple[float, ...], float] = {}
    sign = 1.0 if maximize else -1.0

    def value(w: tuple[float, ...]) -> float:
        k = _key(w)
        if k not in seen:
            seen[k] = float(score(k))
        return seen[k]

    singles = [tuple(grid[-1] if j == i else 0.0 for j in range(n)) for i in range(n)]
    best = max(singles, key=lambda w: sign * value(w))  # first of equals: the order members were given
    trace = [{"weights": list(_key(best)), "score": value(best)}]
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for i in range(n):
            for g in grid:
                w = best[:i] + (g,) + best[i + 1:]
                if w == best or sum(w) <= 0:
                    continue
                if sign * value(w) > sign * value(best) + 1e-9:
                    best, changed = w, True
                    trace.append({"weights": list(_key(best)), "score": value(best)})
        if not changed:
            break
    return WeightSearch(_key(best), best, value(best), len(seen), rounds, trace)


def _markdown(result: dict) -> str:
    metric = result["select_metric"]
    lines = [f"# Score ensemble chosen on {result['data']} ({result['split']})", "",
             "Images embedded with flip test-time augmentation (each averaged with its mirror)."
             if result.get("flip_tta") else "No test-time augmentation.", "",
             f"Weights by greedy coordinate ascent on the grid {result['search']['grid']} maximising dev {metric} "
             f"({result['search']['evaluated']} weightings tried, {result['search']['rounds']} rounds); "
             + ("test evaluated once, after the choice." if result.get("test") else "test not evaluated."), "",
             f"| member | weight | {result['split']} T→I R@1 | I→T R@1 | {metric} |", "|---|---|---|---|---|"]
    for spec, m in result["members_dev"].items():
        w = result["all_weights"][spec]
        lines.append(f"| {spec} | {w:.3f} | {m['t2i_r1']:.2f} | {m['i2t_r1']:.2f} | {m[metric]:.2f} |")
    d = result["dev"]
    lines.append(f"| **ensemble** | | {d['t2i_r1']:.2f} | {d['i2t_r1']:.2f} | {d[metric]:.2f} |")
    if result.get("test"):
        t = result["test"]
        lines += ["", f"Test ({result['test_split']}): T→I R@1 {t['t2i_r1']:.2f}, R@5 {t['t2i_r5']:.2f}, "
                  f"R@10 {t['t2i_r10']:.2f}; I→T R@1 {t['i2t_r1']:.2f}, R@5 {t['i2t_r5']:.2f}, R@10 {t['i2t_r10']:.2f}; "
                  f"R-sum {t['rsum']:.2f}"]
    return "\n".join(lines) + "\n"


def choose_ensemble(member_specs: Sequence[str], *, data: str, run_dir: str | Path, split: str = "dev",
                    test_split: str = "test", test: bool = False, grid: Sequence[float] = DEFAULT_GRID,
                    metric: str = "rsum", flip_tta: bool = False, image_root: str | None = None, cache_dir=None,
                    device="cpu", progress: bool = True, log=print) -> dict:
    """Choose ensemble weights of ``member_specs`` on ``split`` of ``data`` and write the ensemble model folder
    ``run_dir`` (``ensemble.json`` + ``results.md``); returns the JSON record. ``flip_tta``: every member embeds
    each image averaged with its mirror, in the search and whenever the folder is used as a model."""
    if len(member_specs) < 2:
        raise ConfigError("an ensemble needs at least two models")
    if len(set(member_specs)) != len(member_specs):
        raise ConfigError(f"a model is listed twice among {list(member_specs)}")
    for spec in member_specs:
        if str(spec).startswith("ensemble:") or (Path(spec).is_dir() and model_folder_kind(Path(spec)) == "ensemble"):
            raise ConfigError(f"{spec} is an ensemble; ensembles do not nest: list its members instead")
    direction = metric_direction(metric)
    if test:
        if split == test_split:
            raise ConfigError(f"split {split!r} chooses the weights, so the test evaluation must report another split "
                              "(selection on dev only)")
        check_disjoint_splits(data, {"selection": split, "test": test_split}, image_root=image_root)
    models = [load_model(s, device=device) for s in member_specs]  # every member loads before any long work
    cache = FeatureCache(cache_dir)
    ds = load_caption_dataset(data, split, image_root=image_root)
    embedded, members_dev = [], {}
    for spec, model in zip(member_specs, models):
        img, txt, used = encode_dataset(model, ds, cache=cache, device=device, progress=progress, flip_tta=flip_tta)
        embedded.append((img, txt))
        members_dev[spec] = retrieval_metrics(img, txt, used.caption_image).metrics
        log(f"{spec}: {split} T→I R@1 {members_dev[spec]['t2i_r1']:.2f}, I→T R@1 {members_dev[spec]['i2t_r1']:.2f}, "
            f"{metric} {members_dev[spec][metric]:.2f}")
    caption_image = used.caption_image

    def dev_metrics(weights: Sequence[float]) -> dict:
        keep = [i for i, w in enumerate(weights) if w > 0]
        img = join_embeddings([embedded[i][0] for i in keep], [weights[i] for i in keep])
        txt = join_embeddings([embedded[i][1] for i in keep], [weights[i] for i in keep])
        return retrieval_metrics(img, txt, caption_image).metrics

    found = search_weights(lambda w: dev_metrics(w)[metric], len(models), grid, maximize=direction == "max")
    keep = [i for i, w in enumerate(found.weights) if w > 0]
    log(f"chosen on {split} {metric}: " + ", ".join(f"{member_specs[i]} {found.weights[i]:.3f}" for i in keep)
        + f" ({found.score:.2f}; {found.evaluated} weightings tried)")
    run_dir = Path(run_dir)
    result = {"members": [ensemble_member_spec(member_specs[i], run_dir) for i in keep],
              "weights": [found.weights[i] for i in keep], "flip_tta": flip_tta,
              "all_weights": dict(zip(member_specs, found.weights)),
              "data": str(data), "split": split, "select_metric": metric, "direction": direction,
              "dev": dev_metrics(found.weights), "members_dev": members_dev,
              "search": {"method": "greedy coordinate ascent from the best single member", "grid": list(grid),
                         "evaluated": found.evaluated, "rounds": found.rounds, "trace": found.trace},
              "test_split": test_split, "test": None, "provenance": rundir.provenance()}
    if len(keep) == 1:
        log(f"note: one member alone is best on {split}; the folder is an ensemble of one")
    write_json(run_dir / rundir.ENSEMBLE, result)  # a loadable model from here on
    if test:
        model = load_model(run_dir, device=device)  # as users will load it
        img, txt, used = encode_dataset(model, load_caption_dataset(data, test_split, image_root=image_root),
                                        cache=cache, device=device, progress=progress)
        result["test"] = retrieval_metrics(img, txt, used.caption_image).metrics
        write_json(run_dir / rundir.ENSEMBLE, result)
    write_text(run_dir / rundir.RESULTS_MD, _markdown(result))
    return result
