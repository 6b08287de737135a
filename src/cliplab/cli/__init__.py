"""Command-line interface: ``cliplab train | eval retrieval|zeroshot|probe | index | search | serve | caption ...``.

One module per area (``train``, ``evaluate``, ``search``, ``caption``, ``tools``; shared options in ``common``).
Every command parses options, calls one public library function and prints its result; the run folder it
writes is the library's. User errors print as one line (``error: ...``) with exit code 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from cliplab.cli import caption, evaluate, search, tools, train  # noqa: F401  (each registers its commands)
from cliplab.cli.common import app, console
from cliplab.errors import CliplabError

__all__ = ["app", "main"]


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point; ``argv`` (default ``sys.argv[1:]``) lets tests run commands in-process.

    A user error (:class:`CliplabError`) prints one line and exits 2; any other exception prints one line
    ``error: Type: message`` and exits 1, with its traceback too under ``--debug`` or ``CLIPLAB_DEBUG=1``.
    """
    import os
    import traceback

    from rich.markup import escape

    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)  # after a lone --, every word is an argument
    given = "--debug" in args[:end]
    if given:  # accepted after the command too (`cliplab search cat --debug`): moved to the front
        args = ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]
    debug = given or os.environ.get("CLIPLAB_DEBUG", "").strip() not in ("", "0")
    try:
        app(args=args, prog_name="cliplab")
    except CliplabError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # a bug or an environment problem, not the user's input
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        hint = "" if debug else " (run with --debug for the traceback)"
        console.print(f"[red]error:[/red] {escape(type(exc).__name__)}{': ' if message else ''}{escape(message)}"
                      f"{hint}", highlight=False, soft_wrap=True)
        sys.exit(1)
    finally:
        if argv is None:  # a real process: spare its exit the last full garbage collection (~2 s after a search)
            import gc

            gc.freeze()
