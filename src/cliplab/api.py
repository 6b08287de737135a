"""The notebook API: the CLI's operations as Python calls with the same defaults and run folders.

``import cliplab`` exposes these (loaded on first use, so importing cliplab stays cheap)::

    import cliplab
    model = cliplab.load_model("conse")
    zs = cliplab.zeroshot(model, "../shared/data/cifar10", prompts=["clip80"], similarity="cosine")
    zs.table()                      # a pandas DataFrame (rows without pandas)
    pr = cliplab.probe(model, "../shared/data/cifar10")
    run = cliplab.train("flickr8k_heads", overrides={"train.epochs": 5}, run_dir="runs/heads")
    cliplab.evaluate([model, run.run_dir], "../shared/data/flickr8k", split="test").table()
    cliplab.Index("runs/photos-index").search("a dog on the beach")

Each call runs the same library function as its command (``cliplab eval zeroshot`` -> :func:`zeroshot`, see
``docs/python_api.md``), so a notebook and a command give identical numbers and folders.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingBase
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cliplab.results import ResultTable, figure_of

__all__ = ["load_model", "zeroshot", "probe", "evaluate", "train", "sweep", "report", "Index", "Table", "TrainRun",
           "CaptionRun", "CaptionScores"]


def load_model(spec, *, device: str = "cpu"):
    """A model by spec: a run or model folder, ``conse``, ``clip:ARCH[@TAG]`` / ``clip:PATH``, an ensemble folder."""
    from cliplab.models.factory import load_model as factory_load

    return factory_load(spec, device=device)


def zeroshot(model, data, *, prompts: Sequence[str] = (), similarity: str = "both", split: Optional[str] = None,
             run_dir: Optional[str | Path] = None, **options):
    """``cliplab eval zeroshot``: accuracy / macro-F1 per prompt variant and similarity (a
    :class:`~cliplab.experiments.ZeroShotRun`); ``prompts``: named sets or templates with ``{}``."""
    from cliplab.experiments import run_zeroshot

    return run_zeroshot(data, model, split=split, variants=list(prompts), similarity=similarity, run_dir=run_dir,
                        **options)


def probe(model, train, test=None, *, run_dir: Optional[str | Path] = None, **options):
    """``cliplab eval probe``: linear probe(s) on frozen image features vs zero-shot on the same test images.
    ``train`` is a labelled path (its train/test splits are used) or a dataset; ``test`` a second dataset."""
    from cliplab.experiments import run_probe

    data = train if test is None else (train, test)
    return run_probe(data, model, run_dir=run_dir, **options)


def evaluate(models, data, *, split: str = "test", run_dir: Optional[str | Path] = None, **options):
    """``cliplab eval retrieval``: Recall@1/5/10, MRR and ranks both ways for one model or several."""
    from cliplab.experiments import run_retrieval

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    return run_retrieval(data, models, split=split, run_dir=run_dir, **options)


def train(config=None, *, overrides: Mapping[str, Any] | Sequence[str] = (), data: Optional[str] = None,
          run_dir: Optional[str | Path] = None, resume: bool = True, track_test: bool = False,
          plots: bool = False, log=print) -> "TrainRun":
    """``cliplab train``: a packaged config name, a YAML path or a :class:`~cliplab.train.config.RunConfig`
    (default: the defaults, as the command without ``-c``), with ``overrides`` (``{"train.lr": 1e-4}`` or ``["train.lr=1e-4"]``); resumes ``run_dir`` by default."""
    import time

    from cliplab.train.config import RunConfig
    from cliplab.train.run import train_run

    cfg = config if isinstance(config, RunConfig) else RunConfig.load(config) if config else RunConfig()
    extra = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    extra += [f"data.path={data}"] if data else []
    cfg = cfg.with_overrides(extra) if extra else cfg
    out = Path(run_dir) if run_dir else Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    results = train_run(cfg, out, resume=resume, log=log, track_test=track_test, plots=plots)
    return TrainRun(out, results)


def sweep(sweep_file, out_dir, *, fresh: bool = False, test: str = "all", log=print) -> "Table":
    """``cliplab sweep``: every setting of a sweep YAML, one row each."""
    from cliplab.train.sweep import run_sweep

    return Table(run_sweep(sweep_file, out_dir, fresh=fresh, test=test, log=log), title=f"sweep: {sweep_file}")


def report(runs: Sequence[str | Path], out: str | Path = "report.html", *, title: str = "cliplab report",
           pdf: Optional[str | Path] = None) -> Path:
    """``cliplab report``: one self-contained HTML page for the runs (and the same page as a PDF with ``pdf``)."""
    from cliplab.viz.report import build_report, check_report_outputs, report_pdf

    check_report_outputs(out, pdf)
    path = build_report(list(runs), out, title=title)
    if pdf is not None:
        report_pdf(path, pdf)
    return path


class Table(ResultTable):
    """Rows of results: ``.table()`` is a pandas DataFrame when pandas is installed; renders in Jupyter."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], title: str = "") -> None:
        self._rows, self.title = [dict(r) for r in rows], title

    @property
    def rows(self) -> list[dict]:
        return self._rows

    def table_rows(self) -> list[dict]:
        return self._rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r}, {len(self._rows)} rows)"


class _EpochRecords:
    """``curves()`` and ``epochs()`` of a run folder trained on the engine (its ``metrics.jsonl``)."""

    run_dir: Path

    def curves(self):
        """Training loss and dev (and tracked test) metrics over epochs, the selected epoch marked: the figure
        ``--plots`` writes to ``plots/curves.png``."""
        from cliplab.viz.runs import plot_training

        return figure_of(lambda _: plot_training(self.run_dir))

    def epochs(self) -> "Table":
        """One row per epoch: training loss and the dev (and tracked test) metrics."""
        return Table(_epoch_rows(self.run_dir), title=f"epochs: {self.run_dir}")


class _AsMapping(MappingBase):
    """A result object that also reads as its plain record (``_record()``), as the dicts these calls returned."""

    def _record(self) -> dict:
        raise NotImplementedError

    def __getitem__(self, key: str):
        return self._record()[key]

    def __iter__(self):
        return iter(self._record())

    def __len__(self) -> int:
        return len(self._record())


class TrainRun(_EpochRecords, Table):
    """A finished training run: test retrieval per model, the per-epoch records and the run folder."""

    def __init__(self, run_dir: Path, results: dict) -> None:
        self.run_dir, self.results = Path(run_dir), results
        super().__init__([{"model": name, **metrics} for name, metrics in results["test"].items()],
                         title=f"test retrieval: {run_dir}")

    @property
    def best_epoch(self) -> int:
        return self.results["fit"]["best_epoch"]


def _epoch_rows(run_dir: Path) -> list[dict]:
    from cliplab import rundir

    return [_flat_record(r) for r in rundir.read_metrics(run_dir)]


def _flat_record(record: dict) -> dict:
    out = {k: v for k, v in record.items() if not isinstance(v, dict)}
    for part in ("dev", "test"):
        out.update({f"{part}_{k}": v for k, v in record.get(part, {}).items() if isinstance(v, (int, float))})
    return out


class Index:
    """A photo index folder (``cliplab index``): ``Index(folder).search("a dog on the beach", k=10)``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def build(cls, photos: Sequence[str | Path], out: str | Path, *, model: Optional[str] = None,
              **options) -> "Index":
        """``cliplab index PHOTOS --out OUT``: build or update the index (only new and changed files embedded);
        ``captioner="RUN"`` (``--captioner``): a caption run writes one caption per photo, shown and searched;
        ``caption_precision`` (``--caption-precision``): auto, float32 or int8 (:mod:`cliplab.serve.captions`)."""
        from cliplab.serve.index import IndexBuilder

        IndexBuilder(out, model, **options).build([Path(p) for p in photos])
        return cls(out)

    def search(self, *query: str, k: int = 10, like: list[int] = (), unlike: list[int] = (),
               after: Optional[str] = None, before: Optional[str] = None, camera: Optional[str] = None,
               folder: Optional[str] = None, mode: str = "hybrid", device: str = "cpu") -> Table:
        """``cliplab search``: texts, image paths and ``id:N`` combined with ``"+"`` / ``"-"``; ``like`` /
        ``unlike``: ids of results judged relevant / not (Rocchio feedback, ``--like`` / ``--unlike``);
        ``after`` / ``before`` (date taken), ``camera``, ``folder``: filters applied before ranking; ``mode``:
        semantic, keyword or hybrid (``--mode``)."""
        from cliplab.serve.index import PhotoFilter
        from cliplab.serve.query import search_index

        filters = PhotoFilter(after=after, before=before, camera=camera, folder=folder)
        return Table(search_index(self.folder, list(query), k, device=device, like=list(like), unlike=list(unlike),
                                  filters=filters, mode=mode), title=" ".join(query))

    def duplicates(self, threshold: Optional[float] = None):
        """``cliplab duplicates``: exact and near duplicate groups (a ``DuplicateReport``: ``.exact``, ``.near``,
        ``.suggested_removals()``, ``.to_dict()``); nothing is deleted."""
        from cliplab.serve.duplicates import find_duplicates

        return find_duplicates(self.folder, threshold)


class CaptionScores(Table, _AsMapping):
    """``cliplab.caption.evaluate``: BLEU / METEOR / ROUGE-L / CIDEr-D / CLIPScore of the captioner beside the
    nearest-neighbour baseline (``.table()``), the run's ``captions.json`` as a mapping (``["captions"]``, ...),
    and figures: ``gallery()`` (best and worst by CIDEr-D) and ``attention()`` (maps per word)."""

    def __init__(self, run_dir: str | Path, result: dict) -> None:
        self.run_dir, self.results = Path(run_dir), result
        rows = [{"model": name, **{k: v for k, v in result[key].items() if not isinstance(v, (dict, list))}}
                for name, key in (("captioner", "model"), ("nearest neighbour", "nearest_neighbour"))]
        super().__init__(rows, title=f"{self.run_dir} ({result['split']}, {result['n_images']} images): "
                                     f"{result['protocol']}")

    def _record(self) -> dict:
        return self.results

    def to_dict(self) -> dict:
        """The plain record (``captions.json``'s contents), e.g. for ``json.dumps``."""
        return dict(self.results)

    def _split(self, device: str):
        from cliplab.caption.train import CaptionRunConfig, load_split
        from cliplab.embed.cache import FeatureCache

        config = CaptionRunConfig.from_run(self.run_dir)
        return load_split(config, self.results["split"], FeatureCache(config.data.cache_dir), device, False)

    def gallery(self, n: int = 4):
        """The ``n`` best and ``n`` worst captions by CIDEr-D with their images (the ``--plots`` gallery)."""
        from cliplab.caption.figures import gallery_figure

        split = self._split("cpu")
        return figure_of(lambda tmp: gallery_figure(tmp, split, self.results, n))

    def attention(self, images: Optional[Sequence[str]] = None, *, n: int = 4, device: str = "cpu"):
        """Each word's attention over the image of generated captions: ``images`` (names in the split), else the
        ``n // 2`` best and the rest worst by CIDEr-D (the ``--plots`` maps)."""
        from cliplab.caption.figures import attention_figures
        from cliplab.caption.model import Captioner

        split, model = self._split(device), Captioner.load(self.run_dir).to(device)
        return figure_of(lambda tmp: attention_figures(tmp, model, split, self.results, device, n,
                                                       None if images is None else list(images)))


class CaptionRun(_EpochRecords, Table, _AsMapping):
    """``cliplab.caption.train``: the run folder, ``fit`` (the dev-selected epoch, dev CIDEr-D per epoch, trainable
    parameters, seconds) and ``test`` (a :class:`CaptionScores`, None with ``evaluate=False``); ``.table()`` is one
    row per epoch (training loss, dev score), ``curves()`` their figure; also a mapping (``run["fit"]``)."""

    def __init__(self, run_dir: Path, fit: dict, test: Optional[CaptionScores]) -> None:
        self.run_dir, self.fit, self.test = Path(run_dir), fit, test
        super().__init__(_epoch_rows(self.run_dir), title=f"caption training: {self.run_dir}")

    @property
    def best_epoch(self) -> int:
        return self.fit["best_epoch"]

    def _record(self) -> dict:
        return {"run_dir": self.run_dir, "fit": self.fit, "test": self.test}

    def to_dict(self) -> dict:
        """``{"run_dir", "fit", "test"}`` as plain data (``test``: the scores' record or None)."""
        test = None if self.test is None else self.test.to_dict()
        return {"run_dir": str(self.run_dir), "fit": self.fit, "test": test}

    def evaluate(self, **options) -> CaptionScores:
        """Score a split with the dev-selected model (:func:`caption_evaluate`)."""
        return caption_evaluate(self.run_dir, **options)


def caption_train(config="flickr8k_caption", *, overrides: Mapping[str, Any] | Sequence[str] = (),
                  run_dir: Optional[str | Path] = None, resume: bool = True, evaluate: bool = True,
                  plots: bool = False, log=print) -> CaptionRun:
    """``cliplab caption train``: train a captioner (selected on dev CIDEr-D), then score the test split once
    (``evaluate=False``: not yet)."""
    import time

    from cliplab.caption.train import CaptionRunConfig, train_captioner

    extra = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    cfg = config if isinstance(config, CaptionRunConfig) else CaptionRunConfig.load(config)
    cfg = cfg.with_overrides(extra) if extra else cfg
    out = Path(run_dir) if run_dir else Path("runs") / f"caption-{time.strftime('%Y%m%d-%H%M%S')}"
    fit = train_captioner(cfg, out, resume=resume, log=log)
    return CaptionRun(out, fit, caption_evaluate(out, plots=plots, log=log) if evaluate else None)


def caption_evaluate(run, *, split: str = "test", **options) -> CaptionScores:
    """``cliplab caption eval``: BLEU, METEOR, ROUGE-L, CIDEr-D, CLIPScore beside the nearest-neighbour baseline."""
    from cliplab import rundir
    from cliplab.caption.train import evaluate_captioner

    return CaptionScores(run, evaluate_captioner(run, split=split, out_name=rundir.caption_results(split), **options))


class _Datasets:
    """``cliplab.datasets``: ``captions(path, split)`` (Flickr8k, COCO/Karpathy, CSV/JSONL) and
    ``labelled(path, split)`` (class folders, CIFAR, CSV)."""

    @staticmethod
    def captions(path, split: str = "test", **options):
        from cliplab.data.captions import load_caption_dataset

        return load_caption_dataset(path, split, **options)

    @staticmethod
    def labelled(path, split: Optional[str] = None, **options):
        from cliplab.data.labelled import load_labelled

        return load_labelled(path, split=split, **options)

    @staticmethod
    def caption_subset(path, out, *, train: Optional[int] = None, dev: Optional[int] = None,
                       test: Optional[int] = None, **options) -> Path:
        """A CSV of the first N images (with all their captions) of each split of a caption dataset, e.g. a
        quick Flickr8k for a notebook; None keeps a split whole. Train it with ``data.path=OUT``."""
        from cliplab.data.captions import load_caption_dataset, write_caption_csv

        sizes = {"train": train, "dev": dev, "test": test}
        splits = {s: load_caption_dataset(path, s, **options) for s in sizes}
        return write_caption_csv(out, {s: ds.subset(sizes[s]) if sizes[s] else ds for s, ds in splits.items()},
                                 source=str(path))


datasets = _Datasets()
