"""Kill -9 points for the indexing subprocess tests, injected from outside production code:
``python -m tests.crash_points POINT ARGS...`` runs ``cliplab ARGS...`` and SIGKILLs itself at POINT:

- ``image-N``: while decoding the N-th image to embed;
- ``before-vectors`` / ``after-vectors``: before the new generation's vectors / its FAISS file are written;
- ``before-commit`` / ``after-commit``: just before / after ``CURRENT`` is replaced.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _before(module, name: str, when) -> None:
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when(*args):
            _die()
        return real(*args, **kwargs)

    setattr(module, name, wrapped)


def install(point: str) -> None:
    from cliplab.data.images import ImageFiles
    from cliplab.serve import index

    if point.startswith("image-"):
        n = int(point.removeprefix("image-"))
        _before(ImageFiles, "load", lambda self, i: i == n)
    elif point == "before-vectors":
        _before(index, "write_npy", lambda path, *_: Path(path).name.startswith("vectors-"))
    elif point == "after-vectors":
        _before(index, "atomic_write", lambda path, *_: Path(path).name.startswith("faiss-"))
    elif point == "before-commit":
        _before(index, "write_json", lambda path, *_: Path(path).name == index.CURRENT)
    elif point == "after-commit":
        real = index.write_json

        def write_then_die(path, obj):
            out = real(path, obj)
            if Path(path).name == index.CURRENT:
                _die()
            return out

        index.write_json = write_then_die
    else:
        raise SystemExit(f"unknown crash point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from cliplab.cli import main

    main(sys.argv[2:])
