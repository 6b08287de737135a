"""Choose the weights of a score ensemble on dev data (``cliplab ensemble``), for caption retrieval (dev R-sum by
default) or for zero-shot classification (accuracy on a labelled split that is not the test split).

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
from cliplab.data.labelled import assert_disjoint, load_labelled
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import encode_dataset, encode_images
from cliplab.errors import ConfigError
from cliplab.eval.classification import classification_metrics
from cliplab.eval.evaluators import RetrievalEvaluator, ZeroShotEvaluator
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.zeroshot import ZeroShotClassifier, resolve_templates, template_mean_embeddings
from cliplab.models.ensemble import ensemble_member_spec, join_embeddings
from cliplab.models.factory import is_ensemble_spec, load_model
from cliplab.models.wrappers import with_flip_tta
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
    metric, evaluator = result["select_metric"], _OBJECTIVES[result["task"]].evaluator
    cols = [(k, h) for k, h in evaluator.brief_columns() if k != metric and k in result["dev"]] + [(metric, metric)]
    what = "retrieval" if result["task"] == "retrieval" else f"zero-shot classification ({result['templates']} prompts)"
    lines = [f"# Score ensemble for {what}, chosen on {result['data']} ({result['split']})", "",
             "Images embedded with flip test-time augmentation (each averaged with its mirror)."
             if result.get("flip_tta") else "No test-time augmentation.", "",
             f"Weights by greedy coordinate ascent on the grid {result['search']['grid']} maximising "
             f"{result['split']} {metric} ({result['search']['evaluated']} weightings tried, "
             f"{result['search']['rounds']} rounds); "
             + ("test evaluated once, after the choice." if result.get("test") else "test not evaluated."), "",
             f"| member | weight | " + " | ".join(f"{result['split']} {h}" for _, h in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for spec, m in result["members_dev"].items():
        lines.append(f"| {spec} | {result['all_weights'][spec]:.3f} | " + " | ".join(f"{m[k]:.2f}" for k, _ in cols)
                     + " |")
    lines.append("| **ensemble** | | " + " | ".join(f"{result['dev'][k]:.2f}" for k, _ in cols) + " |")
    if result.get("test"):
        t = result["test"]
        lines += ["", f"Test ({result['test_split']}): " + ", ".join(f"{h} {t[k]:.2f}" for k, h in cols)]
    return "\n".join(lines) + "\n"


class _Retrieval:
    """Caption retrieval on a split: members' unit embeddings once, any weighting's metrics from them."""

    task, evaluator = "retrieval", RetrievalEvaluator

    def __init__(self, data: str, split: str, test_split: str, image_root: str | None) -> None:
        self.data, self.split, self.test_split, self.image_root = data, split, test_split, image_root
        self.ds = load_caption_dataset(data, split, image_root=image_root)

    def check(self, test: bool) -> None:
        if test:
            check_disjoint_splits(self.data, {"selection": self.split, "test": self.test_split},
                                  image_root=self.image_root)

    def embed(self, model, **kw) -> tuple:
        img, txt, _ = encode_dataset(model, self.ds, **kw)  # unreadable images raise: rows stay those of self.ds
        return img, txt

    def metrics(self, parts: list[tuple], weights: Sequence[float]) -> dict:
        img = join_embeddings([p[0] for p in parts], weights)
        txt = join_embeddings([p[1] for p in parts], weights)
        return retrieval_metrics(img, txt, self.ds.caption_image).metrics

    def test_metrics(self, model, **kw) -> dict:
        img, txt, used = encode_dataset(model, load_caption_dataset(self.data, self.test_split,
                                                                    image_root=self.image_root), **kw)
        return retrieval_metrics(img, txt, used.caption_image).metrics


class _ZeroShot:
    """Zero-shot classification of a labelled split: per member, unit image embeddings and the template means of
    its unit class-prompt embeddings; an ensemble's class embedding is the normalised mean over templates of the
    joined prompt embeddings, so its cosine score is ``sum_i w_i <x_i, m_i> / sqrt(sum_i w_i |m_i|^2)`` per class
    (what :class:`ZeroShotClassifier` computes for the ensemble model, tested)."""

    task, evaluator = "zeroshot", ZeroShotEvaluator

    def __init__(self, data: str, split: str, test_split: str, templates: str) -> None:
        self.data, self.split, self.test_split, self.templates = data, split, test_split, templates
        resolve_templates(templates)
        self.ds = load_labelled(data, split=split)

    def check(self, test: bool) -> None:
        if test:
            self.test_ds = load_labelled(self.data, split=self.test_split)
            if self.test_ds.class_names != self.ds.class_names:
                raise ConfigError(f"{self.data}: classes of {self.split!r} and {self.test_split!r} differ")
            assert_disjoint(self.ds, self.test_ds)

    def embed(self, model, **kw) -> tuple:
        img = encode_images(model, self.ds.images, normalize=True, **kw)
        means = template_mean_embeddings(model, self.ds.class_names, resolve_templates(self.templates))
        return img, means

    def metrics(self, parts: list[tuple], weights: Sequence[float]) -> dict:
        num = sum(w * (p[0] @ p[1].T) for w, p in zip(weights, parts))
        den = sum(w * (p[1] ** 2).sum(-1) for w, p in zip(weights, parts)).sqrt()
        return classification_metrics(self.ds.labels, (num / den).numpy(), self.ds.class_names)

    def test_metrics(self, model, **kw) -> dict:
        emb = encode_images(model, self.test_ds.images, **kw)
        scores = ZeroShotClassifier(model, self.test_ds.class_names, self.templates).scores(emb).cpu().numpy()
        return classification_metrics(self.test_ds.labels, scores, self.test_ds.class_names)


_OBJECTIVES = {"retrieval": _Retrieval, "zeroshot": _ZeroShot}


def choose_ensemble(member_specs: Sequence[str], *, data: str, run_dir: str | Path, split: str = "dev",
                    test_split: str = "test", test: bool = False, grid: Sequence[float] = DEFAULT_GRID,
                    metric: str | None = None, flip_tta: bool = False, task: str = "retrieval",
                    templates: str = "clip80", image_root: str | None = None, cache_dir=None, device="cpu",
                    progress: bool = True, log=print) -> dict:
    """Choose ensemble weights of ``member_specs`` on ``split`` of ``data`` and write the ensemble model folder
    ``run_dir`` (``ensemble.json`` + ``results.md``); returns the JSON record. ``task``: ``retrieval`` (a caption
    dataset, metric ``rsum`` by default) or ``zeroshot`` (a labelled set, ``templates`` prompts, metric
    ``accuracy``). ``flip_tta``: every member embeds each image averaged with its mirror, in the search and
    whenever the folder is used as a model."""
    if len(member_specs) < 2:
        raise ConfigError("an ensemble needs at least two models")
    if len(set(member_specs)) != len(member_specs):
        raise ConfigError(f"a model is listed twice among {list(member_specs)}")
    for spec in member_specs:
        if is_ensemble_spec(spec):
            raise ConfigError(f"{spec} is an ensemble; ensembles do not nest: list its members instead")
    if task not in _OBJECTIVES:
        raise ConfigError(f"ensemble task must be retrieval or zeroshot, not {task!r}")
    if test and split == test_split:
        raise ConfigError(f"split {split!r} chooses the weights, so the test evaluation must report another split "
                          "(selection on dev only)")
    rundir.claim_run_folder(run_dir, "ensemble")  # a folder of the user's is refused before any work
    metric = metric or _OBJECTIVES[task].evaluator.primary_metric
    direction = _OBJECTIVES[task].evaluator.direction(metric)  # an unknown metric: refused, naming the valid ones
    objective = _Retrieval(data, split, test_split, image_root) if task == "retrieval" else \
        _ZeroShot(data, split, test_split, templates)
    objective.check(test)
    models = [with_flip_tta(load_model(s, device=device), flip_tta)  # every member loads before any long work
              for s in member_specs]
    cache = FeatureCache(cache_dir)
    embedded, members_dev = [], {}
    for spec, model in zip(member_specs, models):
        with torch.inference_mode():
            embedded.append(objective.embed(model, cache=cache, device=device, progress=progress))
        members_dev[spec] = _brief(objective.metrics([embedded[-1]], [1.0]))
        log(f"{spec}: {split} {metric} {members_dev[spec][metric]:.2f}")

    def dev_metrics(weights: Sequence[float]) -> dict:
        keep = [i for i, w in enumerate(weights) if w > 0]
        return objective.metrics([embedded[i] for i in keep], [weights[i] for i in keep])

    found = search_weights(lambda w: dev_metrics(w)[metric], len(models), grid, maximize=direction == "max")
    keep = [i for i, w in enumerate(found.weights) if w > 0]
    log(f"chosen on {split} {metric}: " + ", ".join(f"{member_specs[i]} {found.weights[i]:.3f}" for i in keep)
        + f" ({found.score:.2f}; {found.evaluated} weightings tried)")
    run_dir = Path(run_dir)  # claimed before the work
    result = {"members": [ensemble_member_spec(member_specs[i], run_dir) for i in keep],
              "weights": [found.weights[i] for i in keep], "flip_tta": flip_tta,
              "all_weights": dict(zip(member_specs, found.weights)), "task": task,
              "templates": templates if task == "zeroshot" else None,
              "data": str(data), "split": split, "select_metric": metric, "direction": direction,
              "dev": _brief(dev_metrics(found.weights)), "members_dev": members_dev,
              "search": {"method": "greedy coordinate ascent from the best single member", "grid": list(grid),
                         "evaluated": found.evaluated, "rounds": found.rounds, "trace": found.trace},
              "test_split": test_split, "test": None, "provenance": rundir.provenance()}
    if len(keep) == 1:
        log(f"note: one member alone is best on {split}; the folder is an ensemble of one")
    write_json(run_dir / rundir.ENSEMBLE, result)  # a loadable model from here on
    if test:
        model = load_model(run_dir, device=device)  # as users will load it
        with torch.inference_mode():
            result["test"] = _brief(objective.test_metrics(model, cache=cache, device=device, progress=progress))
        write_json(run_dir / rundir.ENSEMBLE, result)
    write_text(run_dir / rundir.RESULTS_MD, _markdown(result))
    return result


def _brief(metrics: dict) -> dict:
    """The scalar metrics (classification results also carry per-class tables and a confusion matrix)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
