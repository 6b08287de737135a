"""``cliplab report``: one self-contained HTML page for one or more runs (opens offline, shareable).

Recognised run folders: training runs (``results.json`` + ``metrics.jsonl``), retrieval evaluations
(``metrics.json``), zero-shot runs (``zeroshot.json``), probes (``probe.json``) and sweeps
(``results.csv`` + ``curves.csv``). Figures are read from ``RUN/plots/`` and embedded as data URIs;
training curves and sweep overlays are drawn on the spot when missing.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Sequence

from cliplab import rundir
from cliplab.errors import ConfigError
from cliplab.eval.evaluators import CaptionEvaluator, ClassificationEvaluator, RetrievalEvaluator
from cliplab.utils import atomic_write, refuse_foreign_file, write_text

# cliplab's marks on the files it writes (an existing file is replaced only when it carries one)
HTML_MARK = '<meta name="generator" content="cliplab report">'
LEGACY_HTML_HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'  # reports before the mark
PDF_MARK = b"%cliplab-report\n"  # a PDF comment just before the final startxref (offsets are unchanged)
PNG_MARK = ("Software", "cliplab report")  # a PNG text chunk

RETRIEVAL_COLUMNS = list(RetrievalEvaluator.columns)  # the evaluators' columns
CLASS_COLUMNS = ClassificationEvaluator.brief_columns()

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:18px 32px}header h1{margin:0;font-size:24px}
main{padding:8px 32px 48px}section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:18px 0;padding:8px 20px}
h2{border-bottom:1px solid #eee;padding-bottom:6px}table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f0f3f6;cursor:pointer}tr.best td{font-weight:600}
figure{display:inline-block;margin:8px;vertical-align:top;max-width:100%}figure img{max-width:560px;border:1px solid #ccc;cursor:zoom-in}
figure.zoom img{max-width:100%;cursor:zoom-out}figcaption{font-size:13px;color:#555}
nav a{color:#cfe3f7;margin-right:14px}code{background:#f3f3f3;padding:1px 4px}
"""

SCRIPT = """
document.querySelectorAll('figure').forEach(function (f) {
  f.addEventListener('click', function () { f.classList.toggle('zoom'); });
});
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var desc = th.dataset.desc !== '1'; th.dataset.desc = desc ? '1' : '0';
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[th.cellIndex].textContent), y = parseFloat(b.cells[th.cellIndex].textContent);
      if (isNaN(x) || isNaN(y)) { return a.cells[th.cellIndex].textContent.localeCompare(b.cells[th.cellIndex].textContent); }
      return desc ? y - x : x - y;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _table(header: list[str], rows: list[list], sortable: bool = True) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _figures(run_dir: Path) -> str:
    pngs = sorted((run_dir / rundir.PLOTS).glob("*.png"))
    if not pngs:
        return "<p>No figures (run with <code>--plots</code>).</p>"
    return "".join(f"<figure>{_img(p)}<figcaption>{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>"
                   for p in pngs)


def _describe_train(run_dir: Path, res: dict) -> dict:
    config = rundir.read_json(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).is_file() else {}
    return {"retrieval": res["test"], "results": res, "config": config}


def _describe_ensemble(run_dir: Path, res: dict) -> dict:
    key = "classification" if res.get("task") == "zeroshot" else "retrieval"
    return {"results": res, **({key: {"ensemble": res["test"]}} if res.get("test") else {})}


# how a kind's record becomes the report's headline numbers ("retrieval" / "classification" join the comparison
# tables); a kind without an entry is shown from its record as it is
DESCRIBE = {
    "train": _describe_train,
    "eval": lambda run_dir, res: {"retrieval": res},
    "zeroshot": lambda run_dir, res: {"classification": res["results"], "results": res},
    "probe": lambda run_dir, res: {"classification": res["results"], "results": res},
    "sweep": lambda run_dir, rows: {"rows": rows},
    "ensemble": _describe_ensemble,
}


def describe_run(run_dir: Path) -> dict:
    """What kind of run a folder holds (:data:`cliplab.rundir.RUN_KINDS`) and its headline numbers."""
    kind = rundir.run_kind(run_dir)
    record = rundir.RUN_KINDS[kind].read(run_dir)
    describe = DESCRIBE.get(kind, lambda run_dir, res: {"results": res})
    return {"kind": kind, **describe(run_dir, record)}


def _retrieval_rows(label: str, metrics: dict[str, dict]) -> list[list]:
    return [[f"{label} / {model}"] + [_fmt(m.get(k, "")) for k, _ in RETRIEVAL_COLUMNS] for model, m in metrics.items()]


def _class_rows(label: str, results: dict[str, dict]) -> list[list]:
    return [[f"{label} / {name}"] + [_fmt(r.get(k, "")) for k, _ in CLASS_COLUMNS] for name, r in results.items()]


def _run_section(run_dir: Path, info: dict, anchor: str) -> str:
    parts = [f'<section id="{anchor}"><h2>{html.escape(run_dir.name)} <small>({info["kind"]})</small></h2>',
             f"<p><code>{html.escape(str(run_dir))}</code></p>"]
    if info["kind"] == "train":
        res, cfg = info["results"], info["config"]
        fit = res.get("fit", {})
        train = cfg.get("train", {})
        facts = [["data", res.get("data", {}).get("test", {}).get("name", "")],
                 ["loss", train.get("loss", "")], ["trainable", train.get("trainable", "")],
                 ["image tower", (train.get("image_tower") or {}).get("mode", "frozen")],
                 ["text tower", (train.get("text_tower") or {}).get("mode", "frozen")],
                 ["epochs / best dev epoch", f"{train.get('epochs', '')} / {fit.get('best_epoch', '')}"],
                 ["training seconds", _fmt(float(res.get("seconds", {}).get("train", 0.0)))]]
        parts.append("<h3>Setup</h3>" + _table(["setting", "value"], facts, sortable=False))
    if "retrieval" in info:
        parts.append("<h3>Test retrieval</h3>" + _table(["model"] + [h for _, h in RETRIEVAL_COLUMNS],
                                                         _retrieval_rows(run_dir.name, info["retrieval"])))
    if "classification" in info:
        parts.append("<h3>Classification</h3>" + _table(["variant / method"] + [h for _, h in CLASS_COLUMNS],
                                                         _class_rows(run_dir.name, info["classification"])))
        if info["kind"] == "zeroshot" and "cosine_vs_dot" in info["results"]:
            parts.append(f"<p>{html.escape(info['results']['cosine_vs_dot']['explanation'])}</p>")
        if info["kind"] == "zeroshot" and "self_training" in info["results"]:
            parts.append(f"<p>Self-training: {html.escape(info['results']['self_training']['protocol'])}</p>")
    if info["kind"] == "sweep":
        rows = info["rows"]
        header = list(rows[0]) if rows else []
        parts.append("<h3>Sweep results</h3>" + _table(header, [[r[h] for h in header] for r in rows]))
    if info["kind"] == "wise":
        res = info["results"]
        header = list(res["rows"][0]) if res["rows"] else []
        parts.append(f"<h3>WiSE-FT: {html.escape(res['initial'])} → {html.escape(res['finetuned'])}</h3>"
                     + _table(header, [[_fmt(r[h]) for h in header] for r in res["rows"]]))
    if info["kind"] == "ensemble":
        res = info["results"]
        metric = res["select_metric"]
        evaluator = RetrievalEvaluator if res.get("task", "retrieval") == "retrieval" else ClassificationEvaluator
        cols = [c for c in evaluator.brief if c != metric] + [metric]
        rows = [[spec, _fmt(res["all_weights"][spec])] + [_fmt(m.get(c, "")) for c in cols]
                for spec, m in res["members_dev"].items()]
        rows.append(["ensemble (chosen)", ""] + [_fmt(res["dev"].get(c, "")) for c in cols])
        parts.append(f"<h3>Score ensemble: weights chosen on {html.escape(res['split'])} {html.escape(metric)}</h3>"
                     + _table(["member", "weight"] + cols, rows))
    if info["kind"] == "caption":
        res = info["results"]
        cols = CaptionEvaluator.brief_columns()
        rows = [[name] + [_fmt(res[name].get(k)) if res[name].get(k) is not None else "n/a" for k, _ in cols]
                for name in ("model", "nearest_neighbour")]
        parts.append(f"<h3>Captioning ({html.escape(res['split'])}, {res['n_images']} images, beam {res['beam']})</h3>"
                     + _table(["model"] + [h for _, h in cols], rows)
                     + f"<p>{html.escape(res['protocol'])}. {html.escape(res['clipscore_note'])}.</p>")
    if info["kind"] not in SPECIFIC_SECTIONS and isinstance(info.get("results"), dict):
        facts = [[k, _fmt(v)] for k, v in info["results"].items() if not isinstance(v, (dict, list))]
        parts.append(f"<h3>Record ({html.escape(rundir.RUN_KINDS[info['kind']].record)})</h3>"
                     + _table(["field", "value"], facts, sortable=False))
    parts.append("<h3>Figures</h3>" + _figures(run_dir) + "</section>")
    return "".join(parts)


SPECIFIC_SECTIONS = ("train", "eval", "zeroshot", "probe", "sweep", "wise", "ensemble", "caption")


def is_own_report(path: Path) -> bool:
    """Whether an HTML file is a cliplab report (its generator mark, or the page head of earlier reports)."""
    with open(path, "rb") as f:
        head = f.read(65536).decode("utf-8", "replace")
    return HTML_MARK in head or (head.startswith(LEGACY_HTML_HEAD) and '<section id="summary"><h2>Runs</h2>' in head)


def is_own_pdf(path: Path) -> bool:
    """Whether a PDF is a report cliplab printed (its comment mark near the end)."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        return PDF_MARK in f.read()


def check_report_outputs(out: str | Path, pdf: str | Path | None = None, screenshots: str | Path | None = None,
                         run_dirs: Sequence[str | Path] = ()) -> None:
    """Before any work: the page, the PDF and the screenshots of ``run_dirs`` are new or cliplab's own."""
    refuse_foreign_file(out, is_own_report, "--out")
    if pdf is not None:
        refuse_foreign_file(pdf, is_own_pdf, "--pdf")
    if screenshots is not None:
        if Path(screenshots).exists() and not Path(screenshots).is_dir():
            raise ConfigError(f"--screenshots {screenshots} is not a folder")
        names = ["overview"] + [_slug(Path(d).name) for d in run_dirs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--screenshots: two sections would share report_{twice[0]}.png (runs whose folders "
                              "have the same name); rename one or leave out --screenshots")
        for name in names:
            refuse_foreign_file(screenshot_file(screenshots, name), is_own_png, "--screenshots")


def screenshot_file(out_dir: str | Path, section: str) -> Path:
    """The PNG of one report section (``overview``, or a run's slug) in the screenshots folder."""
    return Path(out_dir) / f"report_{section}.png"


def build_report(run_dirs: list[str | Path], out: str | Path, title: str = "cliplab report") -> Path:
    """Write one self-contained HTML page comparing ``run_dirs``; returns its path (an existing file is
    replaced only when it is a cliplab report)."""
    from cliplab.viz.runs import plot_sweep, plot_training

    check_report_outputs(out)
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"run folder not found: {d}")
        info = describe_run(d)
        ours = rundir.run_folder_state(d) in ("run", "legacy")  # figures are drawn only into cliplab's folders
        if ours and info["kind"] == "train" and not rundir.plot_file(d, "curves").is_file():
            plot_training(d)
        if ours and info["kind"] == "sweep" and \
                not list((d / rundir.PLOTS).glob(rundir.plot_file(d, "overlay_{}", "*").name)):
            plot_sweep(d)
        runs.append((d, info))
    anchors = [f"run-{i}-{_slug(d.name)}" for i, (d, _) in enumerate(runs)]
    nav = "".join(f'<a href="#{a}">{html.escape(d.name)}</a>' for a, (d, _) in zip(anchors, runs))
    summary = _table(["run", "kind", "folder"], [[d.name, info["kind"], str(d)] for d, info in runs], sortable=False)
    retrieval = [row for d, info in runs if "retrieval" in info for row in _retrieval_rows(d.name, info["retrieval"])]
    classification = [row for d, info in runs if "classification" in info
                      for row in _class_rows(d.name, info["classification"])]
    comparison = ""
    if retrieval:
        comparison += "<h3>Retrieval</h3>" + _table(["run / model"] + [h for _, h in RETRIEVAL_COLUMNS], retrieval)
    if classification:
        comparison += "<h3>Classification</h3>" + _table(["run / variant"] + [h for _, h in CLASS_COLUMNS],
                                                         classification)
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{HTML_MARK}"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><header>"
            f"<h1>{html.escape(title)}</h1><nav>{nav}</nav></header><main>"
            f'<section id="summary"><h2>Runs</h2>{summary}</section>'
            f'<section id="comparison"><h2>Comparison</h2>{comparison or "<p>No comparable metrics.</p>"}'
            f"<p>Click a column header to sort, a figure to enlarge it.</p></section>"
            + "".join(_run_section(d, info, a) for a, (d, info) in zip(anchors, runs))
            + f"</main><script>{SCRIPT}</script></body></html>")
    return write_text(out, page)


def chromium_executable() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        raise ConfigError("screenshots need Chromium (Debian: apt-get install chromium)")
    return path


def _browser(p):
    """Headless Chromium without network chatter (the report is one offline file)."""
    return p.chromium.launch(executable_path=chromium_executable(),
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--disable-component-update", "--disable-sync"])


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ConfigError("screenshots and PDFs need playwright (pip install playwright)") from None
    return sync_playwright()


def report_pdf(report: str | Path, pdf: str | Path) -> Path:
    """The report page printed to PDF by headless Chromium (A4, backgrounds kept): the same page as the HTML,
    marked as cliplab's (an existing file is replaced only when it carries the mark)."""
    pdf = Path(pdf)
    refuse_foreign_file(pdf, is_own_pdf, "--pdf")
    with _playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(Path(report).resolve().as_uri())
        page.wait_for_load_state("load")
        page.emulate_media(media="print")
        data = page.pdf(format="A4", landscape=True, print_background=True,
                        margin={"top": "12mm", "bottom": "12mm", "left": "10mm", "right": "10mm"})
        browser.close()
    return atomic_write(pdf, lambda path: path.write_bytes(mark_pdf(data)))


def mark_pdf(data: bytes) -> bytes:
    """The PDF with cliplab's comment line inserted before its final ``startxref`` (a comment is whitespace to
    PDF readers, and nothing before it moves, so every offset stays right)."""
    at = data.rfind(b"startxref")
    if not data.startswith(b"%PDF") or at < 0:
        raise ValueError("Chromium's output is not a PDF (no startxref)")
    return data[:at] + PDF_MARK + data[at:]


def screenshot_sections(report: str | Path, out_dir: str | Path, width: int = 1400) -> list[Path]:
    """PNG screenshots of the report's header + summary + comparison, and of each run section, marked as
    cliplab's; an existing PNG of the same name is replaced only when it carries the mark (checked for every
    shot before the first is written)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--screenshots {out_dir} is not a folder")
    with _playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(report).resolve().as_uri())
        page.wait_for_load_state("load")
        sections = page.locator("section[id^=run-]").all()
        paths = [screenshot_file(out_dir, "overview")] + \
            [screenshot_file(out_dir, s.get_attribute("id").split("-", 2)[-1]) for s in sections]  # run-I-SLUG
        for path in paths:
            refuse_foreign_file(path, is_own_png, "--screenshots")
        bottom = page.evaluate("document.querySelector('#comparison').getBoundingClientRect().bottom + 10")
        shots = [page.screenshot(clip={"x": 0, "y": 0, "width": width, "height": bottom})]
        shots += [section.screenshot() for section in sections]
        browser.close()
    return [write_marked_png(path, data) for path, data in zip(paths, shots)]


def is_own_png(path: Path) -> bool:
    """Whether a PNG carries cliplab's mark (its ``Software`` text chunk)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get(PNG_MARK[0]) == PNG_MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def write_marked_png(path: Path, data: bytes) -> Path:
    """A PNG (Chromium's screenshot) written atomically with cliplab's text chunk added."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(*PNG_MARK)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return atomic_write(path, lambda tmp: im.save(tmp, format="PNG", pnginfo=info))
