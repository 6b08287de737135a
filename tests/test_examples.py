"""The example notebooks (examples/*.ipynb) run top to bottom in small mode, as CI runs them.

Each notebook is executed in a fresh kernel of this interpreter by ``examples/run_examples.py`` (the script
``make examples`` runs at full size) with ``CLIPLAB_EXAMPLES=small``; a failing cell raises nbclient's
``CellExecutionError`` and fails its test. They read the real data in ``../shared/data`` (CI has it): without it
they are skipped, saying so.
"""

import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CELL_TIMEOUT = 900  # seconds per cell; the six together: 253 s cold and alone, 233 s in `make test` (2-core CPU)


def _runner():
    spec = importlib.util.spec_from_file_location("run_examples", ROOT / "examples" / "run_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOTEBOOKS = sorted((ROOT / "examples").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_six_notebooks_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert [nb.stem[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert "CLIPLAB_EXAMPLES" in code[0].source, f"{path.name}: the first code cell reads CLIPLAB_EXAMPLES"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"the notebooks run on the real data in {DATA}, absent here")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_small_mode(notebook, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / notebook.name
    t0 = time.time()
    # TMPDIR: the notebooks' small-mode run folders (tempfile.mkdtemp) land in pytest's tmp_path, cleaned with it
    _runner().execute(notebook, mode="small", out=out, timeout=CELL_TIMEOUT, env={"TMPDIR": str(tmp_path)})
    print(f"{notebook.name}: {time.time() - t0:.0f} s in small mode")
    nb = nbformat.read(str(out), as_version=4)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]  # the answers, written from the computed numbers
    assert any("text/markdown" in o.get("data", {}) for o in last.outputs), f"{notebook.name}: no answers shown"


@pytest.mark.subprocess
def test_the_runner_shuts_its_kernel_down(tmp_path):
    """nbclient leaves a kernel it is handed running; the runner must stop it (each held ~2 GB)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    import os

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nprint(os.getpid())")])
    path = tmp_path / "pid.ipynb"
    nbformat.write(nb, str(path))
    done = _runner().execute(path, mode="small", timeout=120)
    pid = int(done.cells[0].outputs[0]["text"].strip())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"kernel {pid} still running after the notebook finished")
