"""Everything else: ``report``, ``models``, ``configs`` and ``--version``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cliplab import rundir
from cliplab.cli.common import app, console, print_table


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="run folders: train, eval, zeroshot, probe or sweep outputs"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: str = typer.Option("cliplab report"),
    screenshots: Optional[Path] = typer.Option(None, help="also save a PNG of each report section here "
                                                          "(headless Chromium via Playwright)"),
    pdf: Optional[Path] = typer.Option(None, "--pdf", help="also print the page to this PDF (headless Chromium)"),
) -> None:
    """One self-contained HTML page (metrics, comparisons, figures, galleries) for one or more runs."""
    from cliplab.viz.report import build_report, check_report_outputs, report_pdf, screenshot_sections

    check_report_outputs(out, pdf, screenshots, run_dirs)  # every output new or cliplab's own, before any work
    if pdf is not None:
        from cliplab.viz.report import chromium_executable

        chromium_executable()  # no browser: say so before the page is built
    path = build_report(run_dirs, out, title=title)
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)", soft_wrap=True)
    if pdf is not None:
        console.print(f"pdf: {report_pdf(path, pdf)}", soft_wrap=True)
    if screenshots:
        for shot in screenshot_sections(path, screenshots):
            console.print(f"screenshot: {shot}", soft_wrap=True)


@app.command()
def models(
    measure: bool = typer.Option(False, help="time each installed tower on this machine (cached per machine)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The offline tower zoo: sizes, whether the weights are installed, speed measured here."""
    from cliplab.models.zoo import catalog_dicts

    rows = catalog_dicts(measure)
    if json_out:
        print(json.dumps(rows))
        return
    header = ["name", "kind", "output", "input", "parameters", "installed", "speed here", "source / note"]
    print_table(header, [_zoo_row(r) for r in rows], "towers and decoders", left=header)


def _zoo_row(r: dict) -> list[str]:
    speed = f"{r['speed']:.0f} {r['speed_unit']}" if r["speed"] else ("run --measure" if r["installed"] and
                                                                      r["kind"] != "decoder" else "")
    return [r["name"], r["kind"], str(r["output_dim"] or ""), r["input"],
            f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else "", "yes" if r["installed"] else "no",
            speed, r["note"] or r["source"]]


@app.command("configs")
def configs_command() -> None:
    """List the example configs shipped with cliplab (use a name with -c, e.g. -c flickr8k_heads)."""
    from cliplab.configs import describe, packaged_configs

    rows = [[name, "sweep" if name.startswith("sweep") else "run", describe(path)]
            for name, path in packaged_configs().items()]
    print_table(["name", "kind", "what it is"], rows, "packaged configs", left=["name", "kind", "what it is"])


def _version_callback(value: bool) -> None:
    if value:
        from cliplab import __version__

        info = rundir.provenance()
        commit = f" (git {info['git_commit'][:12]}{', modified' if info.get('git_dirty') else ''})" \
            if "git_commit" in info else ""
        console.print(f"cliplab {__version__}{commit}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error (or set "
                                                             "CLIPLAB_DEBUG=1); without it: one line, exit 1")) -> None:
    """Learn and evaluate shared image-text embedding spaces."""  # --debug is acted on by main()
