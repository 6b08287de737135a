"""Run the example notebooks top to bottom (nbclient), as ``make examples`` and ``tests/test_examples.py`` do.

    python examples/run_examples.py                      # full size; executed copies in runs/examples/
    python examples/run_examples.py --mode small 01 06   # small subsets (CI), only notebooks 01 and 06

Each notebook reads one environment variable, ``CLIPLAB_EXAMPLES`` (``small`` or ``full``), set here for its
kernel. The kernel is this interpreter (the project's virtual environment), whatever Jupyter kernels are
installed, and runs with the repository root as its working directory. A failing cell raises nbclient's
``CellExecutionError`` (the command exits non-zero).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
MODES = ("small", "full")


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The example notebooks in order; ``names`` picks some by prefix or stem (``01``, ``06_search_your_photos``)."""
    found = sorted(EXAMPLES.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    picked = [nb for nb in found if any(nb.stem == n or nb.stem.startswith(n) for n in names)]
    missing = [n for n in names if not any(nb.stem == n or nb.stem.startswith(n) for nb in found)]
    if missing:
        raise SystemExit(f"no example notebook named {', '.join(missing)} in {EXAMPLES}")
    return picked


def execute(path: str | Path, *, mode: str = "small", out: str | Path | None = None, timeout: int = 1800,
            env: dict[str, str] | None = None):
    """Execute one notebook in a fresh kernel with ``CLIPLAB_EXAMPLES=mode`` (``env``: more variables for the
    kernel, e.g. ``TMPDIR``); ``timeout``: seconds per cell. Writes the executed notebook (with outputs) to
    ``out`` when given; returns it."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    nb = nbformat.read(str(path), as_version=4)
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv[0] = sys.executable  # this venv's Python, not whichever `python3` kernelspec is first
    saved = {k: os.environ.get(k) for k in ["CLIPLAB_EXAMPLES", *(env or {})]}
    os.environ.update({"CLIPLAB_EXAMPLES": mode, **(env or {})})  # the kernel inherits this environment
    try:
        NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        try:
            if km.has_kernel:  # nbclient leaves a kernel it was handed running (~2 GB and busy threads each)
                km.shutdown_kernel(now=True)
        except Exception as exc:  # noqa: BLE001 - the notebook's outcome matters more; say it and go on
            print(f"warning: the kernel of {Path(path).name} did not shut down cleanly: {exc}", file=sys.stderr)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if out is not None:  # also when a cell failed: the executed part shows where
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out))
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (number or name prefix); default: all")
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "examples",
                        help="folder for the executed notebooks (default: runs/examples)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = parser.parse_args(argv)
    total = time.time()
    for nb in notebooks(args.names):
        t0 = time.time()
        print(f"{nb.name}: running ({args.mode})", flush=True)
        execute(nb, mode=args.mode, out=args.out / nb.name, timeout=args.timeout)
        print(f"{nb.name}: done in {time.time() - t0:.0f} s -> "
              f"{args.out / nb.name}", flush=True)
    print(f"all done in {time.time() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
