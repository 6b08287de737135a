"""Evaluation protocols as library calls: what ``cliplab eval zeroshot | probe | retrieval`` and ``cliplab embed`` do.

:func:`run_zeroshot` and :func:`run_probe` check every setting before any image is embedded, run the protocol
(splits, self-training on an unlabelled pool, few-shot subsets, mirrored views) and return a result object,
:class:`ZeroShotRun` or :class:`ProbeRun`, whose ``to_dict()`` is the run folder's JSON record. Given ``run_dir``
they write the run folder (``config.json``, ``zeroshot.json`` / ``probe.json``, ``results.md``, ``plots/``): the
commands only parse options, call them and print the result, so a notebook gets the same numbers::

    from cliplab.experiments import run_probe, run_zeroshot

    zs = run_zeroshot("../shared/data/cifar10", "clip:ViT-B-32", variants=["clip80"], similarity="cosine")
    zs.results["clip80|cosine"]["accuracy"]
    pr = run_probe("../shared/data/cifar10", "clip:ViT-B-32", methods=["logistic"], few_shot=16)
    pr.results["probe:logistic"]["accuracy"], pr.protocol_line()

``data`` is a path (a class-per-folder tree, CIFAR folder or image,label CSV, read by
:func:`cliplab.data.labelled.load_labelled`) or a :class:`~cliplab.data.labelled.LabelledImages`; ``model`` a model
spec (run or model folder, ``conse``, ``clip:SPEC``) or a loaded model.

Layer: above ``data``, ``embed``, ``eval`` and ``models`` (these protocols embed images and score them) and below
``train`` and the CLI. It is not in ``eval``, which stays below ``embed`` (``embed.pipeline`` uses
``eval.retrieval``), and it needs nothing from ``train``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from cliplab import rundir
from cliplab.data.images import MirroredImages
from cliplab.data.labelled import LabelledImages, assert_disjoint, available_splits, load_labelled, read_class_names
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import encode_images, image_tower_features
from cliplab.errors import ConfigError
from cliplab.eval.classification import classification_metrics
from cliplab.eval.probe import VAL_FRACTION, check_probe_training_set, probe_vs_zeroshot
from cliplab.eval.self_training import SelfTrainingConfig, self_train as fit_self_training
from cliplab.eval.tables import markdown_table
from cliplab.eval.zeroshot import (DEFAULT_VARIANTS, ZeroShotClassifier, resolve_templates, similarities_for,
                                   zeroshot_experiment)
from cliplab.models.factory import feature_stack, load_model
from cliplab.models.wrappers import with_flip_tta
from cliplab.results import ResultTable, figure_of
from cliplab.utils import resolve_device, write_json, write_text

DataLike = Union[str, Path, LabelledImages]
SIMILARITIES = ("cosine", "dot", "both")
PROBE_METHODS = ("logistic", "torch")


def classification_rows(results: Mapping[str, dict], key_label: str = "variant") -> tuple[list[str], list[list[str]]]:
    """Header and rows of a classification table: accuracy, top-5 and macro P/R/F1 per result (percent)."""
    header = [key_label, "accuracy", "top-5", "macro-F1", "macro-P", "macro-R"]
    rows = [[name, f"{r['accuracy']:.2f}", f"{r.get('top5', float('nan')):.2f}", f"{r['macro_f1']:.2f}",
             f"{r['macro_precision']:.2f}", f"{r['macro_recall']:.2f}"] for name, r in results.items()]
    return header, rows


@dataclass(kw_only=True)
class _Run(ResultTable):
    """A finished run: its record fields (the subclass's), the settings and the folder it was written to; in a
    notebook ``.table()`` / the HTML view show its results, one row per variant, method or model."""

    record_file: ClassVar[str]
    key_label: ClassVar[str]
    config: dict = field(default_factory=dict, repr=False)  # config.json, less the provenance added on writing
    run_dir: Optional[Path] = None
    data: Any = field(default=None, repr=False)  # what the figures draw from (datasets, embeddings); not recorded

    @property
    def title(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The JSON record of the run folder: every result field that is set, in order."""
        skip = {f.name for f in fields(_Run)}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}

    def table_rows(self) -> list[dict]:
        return [{self.key_label: name, **{k: v for k, v in r.items() if isinstance(v, (int, float))}}
                for name, r in getattr(self, "results", {}).items()]

    @classmethod
    def kind(cls) -> str:
        """The run kind (:data:`cliplab.rundir.RUN_KINDS`) whose record this class writes."""
        return next(k.name for k in rundir.RUN_KINDS.values() if k.record == cls.record_file)

    def markdown(self) -> str:
        """``results.md``: the results table under the run's title."""
        return f"### {self.title}\n\n" + markdown_table(*classification_rows(self.results, self.key_label))

    def write(self, run_dir: str | Path) -> Path:
        """Write ``config.json`` (with provenance), the JSON record and ``results.md`` to ``run_dir``."""
        self.run_dir = out = rundir.claim_run_folder(run_dir, self.kind())
        write_json(out / rundir.CONFIG, {**self.config, "provenance": rundir.provenance()})
        write_json(out / self.record_file, self.to_dict())
        write_text(out / rundir.RESULTS_MD, self.markdown())
        return out


@dataclass(kw_only=True)
class ZeroShotRun(_Run):
    """:func:`run_zeroshot`'s result; the fields are those of ``zeroshot.json``."""

    record_file: ClassVar[str] = rundir.ZEROSHOT
    key_label: ClassVar[str] = "variant"
    results: dict  # "variant|similarity" (and "self-trained ...") -> classification metrics
    cosine_vs_dot: Optional[dict] = None  # why the two similarities agree or differ (when both ran)
    top5_images: Optional[dict] = None  # top-5 classes of a few random images (``top5`` in zeroshot.json)
    dataset: str
    model: Any
    n_images: int
    class_names: list
    seconds: dict
    self_training: Optional[dict] = None  # the self-training protocol and rounds (with ``self_train``)

    @property
    def title(self) -> str:
        return f"zero-shot: {self.dataset} ({self.model})"

    def markdown(self) -> str:
        md = super().markdown()
        return md + "\n" + self.cosine_vs_dot["explanation"] + "\n" if self.cosine_vs_dot else md

    def to_dict(self) -> dict:
        return {("top5" if k == "top5_images" else k): v for k, v in super().to_dict().items()}

    def best_variant(self) -> str:
        """The variant|similarity with the highest accuracy (on the evaluated split: a description, not a
        selection; choose prompts on other data)."""
        return max(self.results, key=lambda k: self.results[k]["accuracy"])

    def confusion(self, variant: Optional[str] = None):
        """The confusion matrix of ``variant`` (default: the most accurate), as ``--plots`` draws it."""
        from cliplab.viz.classification import confusion_matrix_plot

        key = variant or self.best_variant()
        r = self.results[key]
        return figure_of(lambda d: confusion_matrix_plot(np.array(r["confusion"]), r["class_names"], d / "c.png",
                                                         title=f"zero-shot, {key}"))

    def top5(self):
        """Top-5 class probabilities of the sampled images (``top5=`` of :func:`run_zeroshot`)."""
        from cliplab.viz.runs import plot_zeroshot

        if not self.top5_images or self.data is None:
            raise ConfigError("no top-5 images in this run (top5=0, or a run read back from its folder)")
        return figure_of(lambda d: plot_zeroshot(d, self.to_dict(), self.data.images, self.data.labels))[-1]


@dataclass(kw_only=True)
class ProbeRun(_Run):
    """:func:`run_probe`'s result; the fields are those of ``probe.json``."""

    record_file: ClassVar[str] = rundir.PROBE
    key_label: ClassVar[str] = "method"
    dataset: dict  # train / test names and sizes
    protocol: dict  # how train and test images were chosen (see protocol_line)
    model: Any
    feature_dim: int
    zeroshot_variant: str
    features: Optional[list] = None  # the image towers whose features the probe used (default: the model's)
    results: dict  # "probe:logistic", "probe:torch", "zeroshot" -> classification metrics (and the fit)
    seconds: dict

    @property
    def title(self) -> str:
        return f"linear probe vs zero-shot: {self.dataset['test']} ({self.model})"

    def protocol_line(self) -> str:
        p = self.protocol
        where = (f"dataset splits {p['train_split']} -> {p['test_split']}" if p["split"] == "dataset" else
                 f"held-out stratified split, {p['test_fraction']:.0%} of each class for test (seed {p['seed']})")
        shots = f", {p['few_shot']}-shot" if p.get("few_shot") else ""
        views = "; fitted on each training image and its mirror" if p.get("flip_train") else ""
        stack = f"; features of {' + '.join(self.features)} side by side" if self.features else ""
        return f"{where}; {p['n_train']} train / {p['n_test']} test images{shots}, disjoint (checked){views}{stack}"

    def markdown(self) -> str:
        return super().markdown() + f"\nProtocol: {self.protocol_line()}\n"

    def confusion(self, method: str = "probe:logistic"):
        """The confusion matrix of a probe (or ``zeroshot``) on the test images."""
        from cliplab.viz.classification import confusion_matrix_plot

        r = self.results[method]
        return figure_of(lambda d: confusion_matrix_plot(np.array(r["confusion"]), r["class_names"], d / "c.png",
                                                         title=method))


def labelled(data: DataLike, split: Optional[str] = None, classes: Optional[str | Path] = None,
             rename: Sequence[str] | Mapping[str, str] = ()) -> LabelledImages:
    """``data`` as a dataset: a path is loaded (its ``split``; ``classes``, a file with one class name per line,
    fixes names and order), a dataset is taken as it is; ``rename`` (``OLD=NEW`` strings or a mapping) renames
    classes for prompts."""
    if isinstance(data, LabelledImages):
        if split is not None or classes is not None:
            raise ConfigError(f"a split or class file applies to a data path; {data.name} is loaded already")
        ds = data
    else:
        ds = load_labelled(data, split=split, class_names=read_class_names(classes) if classes else None)
    if rename:
        pairs = list(rename.items()) if isinstance(rename, Mapping) else [r.split("=", 1) for r in rename]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError("--rename takes OLD=NEW, e.g. --rename automobile=car")
        ds = ds.renamed(dict(pairs))
    return ds


def _describe(x: Any) -> Any:
    """How the settings name a data set or model: a path or spec as given, else its name."""
    if x is None or isinstance(x, (str, Path)):
        return x
    if isinstance(x, tuple):
        return [_describe(d) for d in x]
    return getattr(x, "name", None) or type(x).__name__


def _model(model):
    return load_model(model) if isinstance(model, (str, Path)) else model


def _check_choices(option: str, values: Sequence[str], choices: Sequence[str]) -> None:
    bad = [v for v in values if v not in choices]
    if bad:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, not {bad[0]!r}")


def _check_outputs(plots: bool, run_dir, run: type[_Run]) -> None:
    """Before any work: figures need the ``viz`` extra and a folder; the run folder must be new, empty or
    cliplab's own run of the same kind (it is created with cliplab's marker)."""
    if plots:
        from cliplab.extras import require

        require("matplotlib", "--plots")
        if run_dir is None:
            raise ConfigError("plots are written to the run folder: give run_dir")
    if run_dir is not None:
        rundir.claim_run_folder(run_dir, run.kind())


def run_zeroshot(data: DataLike, model, *, split: Optional[str] = None, variants: Sequence[str] = (),
                 similarity: str = "both", classes: Optional[str | Path] = None,
                 rename: Sequence[str] | Mapping[str, str] = (), top5: int = 8,
                 self_train: Optional[str | LabelledImages] = None, features_model=None, features_flip: bool = True,
                 self_train_fractions: str | Sequence[float] = SelfTrainingConfig.fractions,
                 self_train_c: float = SelfTrainingConfig.c, self_train_selection: str = SelfTrainingConfig.selection,
                 run_dir: Optional[str | Path] = None, cache: FeatureCache | str | Path | None = None,
                 device="auto", seed: int = 0, plots: bool = False, log: Callable[[str], Any] = print) -> ZeroShotRun:
    """Zero-shot accuracy/F1 of ``data`` (its ``split``; default test when it has splits, else all images) for
    each prompt variant (named sets or templates with ``{}``; default: all named sets) and similarity (cosine,
    dot or both), with the top-5 classes of ``top5`` random images. ``self_train``: another split (or dataset)
    used as unlabelled images; the zero-shot classifier's surest predictions there train a logistic classifier
    on ``features_model``'s image features (``self_train_*``: its settings, see
    :class:`~cliplab.eval.self_training.SelfTrainingConfig`), scored beside plain zero-shot. ``log`` gets its
    round-by-round lines. Every setting is checked before any image is embedded."""
    _check_outputs(plots, run_dir, ZeroShotRun)
    _check_choices("--similarity", [similarity], SIMILARITIES)
    for v in variants:
        resolve_templates(v)  # an unknown variant fails before any embedding
    dev = resolve_device(device)
    if split is None and not isinstance(data, LabelledImages) and available_splits(data):
        split = "test"
    ds = labelled(data, split, classes, rename)
    st_config, pool = None, None
    if self_train is not None:
        st_config, pool = _self_training_pool(data, ds, split, self_train, classes, rename, seed=seed,
                                              fractions=self_train_fractions, c=self_train_c,
                                              selection=self_train_selection)
    m = _model(model)
    sims = similarities_for(m, similarity)  # an ensemble defines cosine only
    fm = with_flip_tta(_model(features_model) if features_model is not None else m, features_flip)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    t0 = time.time()
    emb = encode_images(m, ds.images, cache=cache, device=dev, desc=f"{ds.name} images")
    t_embed = time.time() - t0
    picks = sorted(np.random.default_rng(seed).choice(len(ds), size=min(top5, len(ds)), replace=False).tolist())
    result = zeroshot_experiment(m, emb, ds.labels, ds.class_names, variants=tuple(variants) or DEFAULT_VARIANTS,
                                 similarities=sims, top_images=picks)
    result["top5_images"] = result.pop("top5", None)
    run = ZeroShotRun(**result, dataset=ds.name, model=_describe(model), n_images=len(ds),
                      class_names=ds.class_names, seconds={"embed": t_embed, "classify": time.time() - t0 - t_embed},
                      data=ds)
    if pool is not None:
        _self_trained_zeroshot(run, m, fm, ds, pool, variant=variants[0] if variants else "clip80",
                               similarity=sims[0], config=st_config, cache=cache, device=dev, flip_tta=features_flip,
                               log=log, names={"pool_split": _describe(self_train), "features_model": _describe(
                                   model if features_model is None else features_model)})
    run.config = {"data": _describe(data), "split": split or "all", "model": _describe(model),
                  "variants": variants, "similarity": similarity, "rename": rename, "seed": seed,
                  "self_train": _describe(self_train), "features_model": _describe(features_model),
                  "features_flip": features_flip, "self_train_fractions": self_train_fractions,
                  "self_train_c": self_train_c, "self_train_selection": self_train_selection}
    if run_dir is not None:
        run.write(run_dir)
        if plots:
            from cliplab.viz.runs import plot_zeroshot

            plot_zeroshot(run.run_dir, run.to_dict(), ds.images, ds.labels)
    return run


def _self_training_pool(data: DataLike, ds: LabelledImages, split: Optional[str], self_train, classes, rename, *,
                        seed: int, fractions: str | Sequence[float], c: float,
                        selection: str) -> tuple[SelfTrainingConfig, LabelledImages]:
    """The self-training settings and unlabelled pool, checked: another split than the scored one, the same
    classes, no shared image."""
    if isinstance(self_train, str) and self_train == (split or "all"):
        raise ConfigError(f"--self-train {self_train}: the unlabelled pool must be another split than the one "
                          "scored (--split)")
    if isinstance(fractions, str):
        try:
            fractions = tuple(float(f) for f in fractions.split(",") if f.strip())
        except ValueError:
            raise ConfigError(f"--self-train-fractions takes comma-separated numbers, not {fractions!r}") from None
    config = SelfTrainingConfig(fractions=tuple(fractions), c=c, seed=seed, selection=selection)
    pool = (labelled(data, self_train, classes, rename) if isinstance(self_train, str) else
            labelled(self_train, rename=rename))
    if pool.class_names != ds.class_names:
        raise ConfigError(f"--self-train {_describe(self_train)}: its classes {pool.class_names} differ from the "
                          f"scored split's {ds.class_names}")
    assert_disjoint(pool, ds)
    return config, pool


def _self_trained_zeroshot(run: ZeroShotRun, model, features_model, ds: LabelledImages, pool: LabelledImages, *,
                           variant: str, similarity: str, config: SelfTrainingConfig, cache, device, flip_tta: bool,
                           log: Callable[[str], Any], names: dict) -> None:
    """Self-train on ``pool`` (labels unread) from ``model``'s zero-shot probabilities; add the row scoring ``ds``
    to ``run.results`` and the record ``run.self_training`` (with ``names``: how the pool and model are named)."""
    t0, results = time.time(), run.results
    clf = ZeroShotClassifier(model, ds.class_names, variant, similarity)
    pool_emb = encode_images(model, pool.images, cache=cache, device=device, desc=f"{pool.name} images (unlabelled)")
    probs = clf.predict_proba(pool_emb).cpu().numpy()
    x_pool = image_tower_features(features_model, pool.images, cache=cache, device=device,
                                  desc=f"{pool.name} features")
    x_test = image_tower_features(features_model, ds.images, cache=cache, device=device, desc=f"{ds.name} features")
    fitted = fit_self_training(x_pool, probs, config, log=log)
    key = f"self-trained {variant}|{similarity}"
    results[key] = {"variant": key, "similarity": similarity, "n_templates": len(clf.templates),
                    "example": clf.templates[0].format(ds.class_names[0]),
                    **classification_metrics(ds.labels, fitted.scores(x_test), ds.class_names)}
    protocol = (f"zero-shot ({variant}, {similarity}) labels {len(pool)} unlabelled images of {pool.name} (their "
                f"labels never read; disjoint from the scored images, checked); a logistic classifier on "
                f"{x_pool.shape[1]}-d image features{' (flip-averaged)' if flip_tta else ''} is trained on the "
                f"surest pseudo-labels ({config.selection} per class) over {len(config.fractions)} rounds, then scores "
                f"{len(ds)} images of {ds.name} once: {results[key]['accuracy']:.2f}% "
                f"(plain zero-shot {results[f'{variant}|{similarity}']['accuracy']:.2f}%)")
    run.self_training = {"key": key, "n_pool": len(pool), "feature_dim": int(x_pool.shape[1]), "flip_tta": flip_tta,
                         "protocol": protocol, **fitted.summary(), **names}
    run.seconds["self_training"] = time.time() - t0


def run_probe(data: DataLike | tuple[LabelledImages, LabelledImages], model, *, train_split: Optional[str] = None,
              test_split: Optional[str] = None, test_fraction: float = 0.2, methods: Sequence[str] = PROBE_METHODS,
              few_shot: int = 0, variant: str = "clip80", flip_tta: bool = True, power_norm: bool = True,
              flip_train: bool = False, features: Optional[Sequence[str]] = None,
              classes: Optional[str | Path] = None,
              rename: Sequence[str] | Mapping[str, str] = (), run_dir: Optional[str | Path] = None,
              cache: FeatureCache | str | Path | None = None, device="auto", seed: int = 0,
              plots: bool = False) -> ProbeRun:
    """Linear probe(s) (``methods``: logistic, torch) on frozen image features vs zero-shot (``variant``
    prompts), on the same held-out test images: ``data``'s own splits (``train_split`` / ``test_split``, default
    train / test), a ``(train, test)`` pair of datasets, or, for data without splits, a stratified held-out
    ``test_fraction`` of each class. ``few_shot``: k >= 2 training images per class (0: all); ``flip_tta``:
    each image's features averaged with its mirror's; ``flip_train``: the logistic probe fits each training
    image and its mirror as two samples; ``features``: the probe's image features, named image towers side by
    side (``["lite0", "efficientnet_lite2@224"]``: ``ARCH[@SIZE]``, see
    :func:`~cliplab.models.factory.image_tower_config`) instead of ``model``'s own (``model`` still gives the
    zero-shot comparison). Every setting is checked before any feature is computed."""
    _check_outputs(plots, run_dir, ProbeRun)
    _check_choices("--method", methods, PROBE_METHODS)
    resolve_templates(variant)
    if flip_train and (not flip_tta or "torch" in methods):
        raise ConfigError("--flip-train needs --flip-tta (test images get the averaged features) and --method "
                          "logistic only")
    if few_shot < 0 or few_shot == 1:
        raise ConfigError(f"--few-shot {few_shot}: needs 0 (all) or k >= 2 (one image per class is held out "
                          "to choose the regularisation)")
    dev = resolve_device(device)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    train_ds, test_ds, protocol = _probe_datasets(data, train_split, test_split, test_fraction, classes, rename,
                                                  seed=seed, few_shot=few_shot, flip_train=flip_train)
    source = feature_stack(features) if features else None
    m = _model(model)
    t0 = time.time()
    xtr, views, xte = _probe_features(source or m, train_ds, test_ds, flip_tta=flip_tta, flip_train=flip_train,
                                      cache=cache, device=dev)
    emb = encode_images(m, test_ds.images, cache=cache, device=dev, progress=False)
    zs = ZeroShotClassifier(m, test_ds.class_names, variant).scores(emb).cpu().numpy()
    t1 = time.time()
    results = probe_vs_zeroshot(xtr, train_ds.labels, xte, test_ds.labels, test_ds.class_names, methods=tuple(methods),
                                zeroshot_scores=zs, seed=seed, power_norm=power_norm, train_views=views)
    run = ProbeRun(dataset={"train": train_ds.name, "test": test_ds.name, "n_train": len(train_ds),
                            "n_test": len(test_ds)}, protocol=protocol, model=_describe(model),
                   feature_dim=int(xtr.shape[1]), features=list(features) if features else None,
                   zeroshot_variant=variant, results=results,
                   seconds={"features": t1 - t0, "fit": time.time() - t1},
                   config={"data": _describe(data), "model": _describe(model), "train_split": train_split,
                           "test_split": test_split, "test_fraction": test_fraction, "methods": methods,
                           "few_shot": few_shot, "variant": variant, "seed": seed, "flip_tta": flip_tta,
                           "flip_train": flip_train, "power_norm": power_norm,
                           "features": list(features) if features else None})
    if run_dir is not None:
        run.write(run_dir)
        if plots:
            from cliplab.viz.runs import plot_probe

            plot_probe(run.run_dir, run.to_dict(), xte, test_ds.labels, seed=seed)
    return run


def _probe_datasets(data, train_split: Optional[str], test_split: Optional[str], test_fraction: float, classes,
                    rename, *, seed: int, few_shot: int,
                    flip_train: bool) -> tuple[LabelledImages, LabelledImages, dict]:
    """Training and test sets and the protocol record: disjoint (checked), the same classes, enough images."""
    if isinstance(data, tuple):
        train_ds, test_ds = (labelled(d, None, classes, rename) for d in data)
        protocol = {"split": "dataset", "train_split": train_ds.name, "test_split": test_ds.name}
    elif not isinstance(data, LabelledImages) and available_splits(data):
        train_ds = labelled(data, train_split or "train", classes, rename)
        test_ds = labelled(data, test_split or "test", classes, rename)
        protocol = {"split": "dataset", "train_split": train_split or "train", "test_split": test_split or "test"}
    else:
        if train_split or test_split:
            raise ConfigError(f"{_describe(data)} has no splits (no train/ or test/ sub-folder, no split column): "
                              "drop --train-split/--test-split, and --test-fraction holds out a test split")
        train_ds, test_ds = labelled(data, None, classes, rename).stratified_split(test_fraction, seed)
        protocol = {"split": "held-out", "test_fraction": test_fraction, "seed": seed,
                    "note": "stratified: the given fraction of each class, drawn at random with the seed"}
    if train_ds.class_names != test_ds.class_names:
        raise ConfigError(f"train and test classes differ: {train_ds.class_names} vs {test_ds.class_names}")
    if few_shot:
        train_ds = train_ds.few_shot(few_shot, seed)
    assert_disjoint(train_ds, test_ds)  # never score a probe on images it was fitted on
    check_probe_training_set(train_ds.labels, train_ds.class_names)  # before any feature is computed
    protocol.update({"n_train": len(train_ds), "n_test": len(test_ds), "few_shot": few_shot, "flip_train": flip_train,
                     "validation": f"{VAL_FRACTION:.0%} of each class of the training set picks the "
                                   "hyperparameters, then the probe is refit on all training images"})
    return train_ds, test_ds, protocol


def _probe_features(model, train_ds: LabelledImages, test_ds: LabelledImages, *, flip_tta: bool, flip_train: bool,
                    cache, device) -> tuple[np.ndarray, Optional[list[np.ndarray]], np.ndarray]:
    """Training features (with ``flip_train`` also the two views they average) and test features of ``model``
    (any model, or a :class:`~cliplab.models.wrappers.FeatureStack`), flip-averaged with ``flip_tta``."""
    views, source = None, with_flip_tta(model, flip_tta)
    if flip_train:  # each view on its own; their mean is the flip-averaged feature
        plain = with_flip_tta(model, False)
        views = [image_tower_features(plain, imgs, cache=cache, device=device, desc=f"{train_ds.name} images{tag}")
                 for imgs, tag in ((train_ds.images, ""), (MirroredImages(train_ds.images), " (mirrored)"))]
        xtr = (views[0] + views[1]) / 2
    else:
        xtr = image_tower_features(source, train_ds.images, cache=cache, device=device,
                                   desc=f"{train_ds.name} images")
    xte = image_tower_features(source, test_ds.images, cache=cache, device=device, desc=f"{test_ds.name} images")
    return xtr, views, xte


@dataclass(kw_only=True)
class RetrievalRun(_Run):
    """:func:`run_retrieval`'s result: Recall@K, MRR and ranks both ways per model (``metrics.json``)."""

    record_file: ClassVar[str] = rundir.EVAL_METRICS
    key_label: ClassVar[str] = "model"
    results: dict  # model spec -> retrieval metrics
    dataset: str
    split: str
    skipped: dict = field(default_factory=dict)  # model spec -> the dataset's skip report (``on_error="skip"``)

    @property
    def title(self) -> str:
        return f"retrieval: {self.dataset}"

    def to_dict(self) -> dict:
        return dict(self.results)  # ``metrics.json`` holds model -> metrics, as it always has

    def markdown(self) -> str:
        from cliplab.eval.tables import retrieval_markdown

        return retrieval_markdown(self.results, self.dataset)

    def _drawn(self) -> tuple:
        if self.data is None:
            raise ConfigError("this run holds no embeddings (read back from its folder): evaluate again")
        return self.data

    def recall_at_k(self, max_k: int = 50):
        """Recall@K for K = 1..max_k both ways, one line per model."""
        from cliplab.eval.retrieval import retrieval_ranks
        from cliplab.viz.curves import recall_at_k

        dataset, spaces = self._drawn()
        ranks = {n: retrieval_ranks(i, t, dataset.caption_image) for n, (i, t) in spaces.items()}
        return figure_of(lambda d: recall_at_k(ranks, d / "r.png", max_k=max_k, title=f"Recall@K: {dataset.name}"))

    def map(self, method: str = "tsne", max_images: int = 200, seed: int = 0):
        """Images and captions of every model's space in 2-D (``tsne`` or ``pca``), pairs joined."""
        from cliplab.viz.maps import modality_map

        dataset, spaces = self._drawn()
        arrays = {n: (np.asarray(i, dtype=np.float32), np.asarray(t, dtype=np.float32)) for n, (i, t) in spaces.items()}
        return figure_of(lambda d: modality_map(arrays, dataset.caption_image, d / "m.png", method=method,
                                                max_images=max_images, seed=seed))

    def gallery(self, direction: str = "t2i", model: Optional[str] = None):
        """Best successes and worst failures of ``model`` (default: the last), text→image or image→text."""
        from cliplab.viz.galleries import image_to_text_gallery, text_to_image_gallery

        _check_choices("direction", [direction], ("t2i", "i2t"))
        dataset, spaces = self._drawn()
        name = model or list(spaces)[-1]
        draw = text_to_image_gallery if direction == "t2i" else image_to_text_gallery
        label = "text → image" if direction == "t2i" else "image → text"
        return figure_of(lambda d: draw(dataset, *spaces[name], d / "g.png", title=f"{label} ({name})"))


def run_retrieval(data, models: Sequence, *, split: str = "test", image_root: Optional[str | Path] = None,
                  on_error: str = "raise", cache: FeatureCache | str | Path | None = None, device="auto",
                  flip_tta: Optional[bool] = None, run_dir: Optional[str | Path] = None,
                  plots: bool = False) -> RetrievalRun:
    """Recall@1/5/10 both ways, MRR and ranks of each model (specs or loaded models) on one split of a caption
    dataset (a path or a :class:`~cliplab.data.captions.CaptionDataset`); written to ``run_dir`` when given."""
    from cliplab.data.captions import CaptionDataset, load_caption_dataset
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics

    _check_outputs(plots, run_dir, RetrievalRun)
    _check_choices("--on-error", [on_error], ("raise", "skip"))
    dev = resolve_device(device)
    ds = data if isinstance(data, CaptionDataset) else load_caption_dataset(data, split, image_root=image_root,
                                                                              on_error=on_error)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    run = RetrievalRun(results={}, dataset=ds.name, split=split)
    spaces, used = {}, ds
    for spec in models:
        name = str(_describe(spec))
        img, txt, used = encode_dataset(with_flip_tta(_model(spec), flip_tta), ds, cache=cache, on_error=on_error,
                                        device=dev)
        run.results[name] = retrieval_metrics(img, txt, used.caption_image, device=dev).metrics
        run.skipped[name] = used.skipped
        spaces[name] = (img, txt)
    run.data = (used, spaces)
    run.config = {"data": _describe(data), "split": split, "models": [_describe(m) for m in models],
                  "on_error": on_error, "flip_tta": flip_tta}
    if run_dir is not None:
        run.write(run_dir)
        if plots:
            from cliplab.viz.runs import plot_retrieval

            plot_retrieval(run.run_dir, used, spaces)
    return run


@dataclass(kw_only=True)
class EmbedRun(_Run):
    """:func:`run_embed`'s result: what was computed or reused (``embed.json``)."""

    record_file: ClassVar[str] = rundir.EMBED
    key_label: ClassVar[str] = "field"
    summary: dict  # dataset, images, captions, image_dim, text_dim, reused_cache, seconds, skip counts
    skipped: Any = None  # the dataset's skip report

    @property
    def title(self) -> str:
        return f"features: {self.summary['dataset']}"

    def to_dict(self) -> dict:
        return dict(self.summary)

    def table_rows(self) -> list[dict]:
        return [{k: v for k, v in self.summary.items() if not isinstance(v, (dict, list))}]

    def markdown(self) -> str:
        return f"### {self.title}\n\n" + markdown_table(["field", "value"],
                                                         [[k, str(v)] for k, v in self.summary.items()])


def run_embed(data, image_tower, text_tower, *, split: str = "all",
              image_root: Optional[str | Path] = None, on_error: str = "raise",
              cache: FeatureCache | str | Path | None = None, device="auto", batch_size: int = 64,
              backend: str = "auto", engine: str = "local", ray_address: Optional[str] = None, ray_actors: int = 2,
              run_dir: Optional[str | Path] = None) -> EmbedRun:
    """Compute (or reuse from the feature cache) the frozen image- and text-tower features of a caption dataset;
    ``image_tower`` / ``text_tower`` are tower configs (a run config's ``model.image`` / ``model.text``)."""
    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.pipeline import tower_features
    from cliplab.models.factory import pretrained_tower

    _check_choices("--on-error", [on_error], ("raise", "skip"))
    _check_outputs(False, run_dir, EmbedRun)
    t0 = time.time()
    ds = load_caption_dataset(data, split, image_root=image_root, on_error=on_error)
    feats = tower_features(pretrained_tower(image_tower), pretrained_tower(text_tower), ds,
                           cache=cache if isinstance(cache, FeatureCache) else FeatureCache(cache),
                           on_error=on_error, device=resolve_device(device), image_batch_size=batch_size,
                           backend=backend, engine=engine, ray_address=ray_address, ray_actors=ray_actors)
    summary = {"dataset": feats.dataset.name, "images": feats.dataset.num_images,
               "captions": feats.dataset.num_captions, "image_dim": int(feats.image.shape[1]),
               "text_dim": int(feats.text.shape[1]), "reused_cache": feats.reused,
               "seconds": round(time.time() - t0, 2), **feats.dataset.skipped.to_dict()}
    run = EmbedRun(summary=summary, skipped=feats.dataset.skipped)
    record = {side: t.to_dict() if hasattr(t, "to_dict") else t for side, t in (("image", image_tower),
                                                                                ("text", text_tower))}
    run.config = {"data": _describe(data), "split": split, "model": record}
    if run_dir is not None:
        run.write(run_dir)
    return run
