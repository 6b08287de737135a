"""How a result shows itself in a notebook: ``.table()`` (pandas when installed) and an HTML table for Jupyter.

Bottom layer: every result object (zero-shot, probe, retrieval, training runs, search hits) mixes this in and
says what its rows are in :meth:`ResultTable.table_rows`.
"""

from __future__ import annotations

import html
from typing import Any


class ResultTable:
    """Mixin: ``table_rows()`` -> ``table()`` (a pandas DataFrame, else the rows) and ``_repr_html_``."""

    title: str = ""

    def table_rows(self) -> list[dict]:
        raise NotImplementedError

    def table(self):
        """The rows as a pandas DataFrame (a list of dicts when pandas is not installed)."""
        rows = self.table_rows()
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        rows = self.table_rows()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        caption = f"<caption>{html.escape(str(self.title))}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def figure_of(draw):
    """The matplotlib figure(s) ``draw(folder)`` saves, drawn into a temporary folder: the notebook API's plots
    are the very figures the CLI writes with ``--plots``."""
    import tempfile
    from pathlib import Path

    from cliplab.viz.figures import capture_figures

    with tempfile.TemporaryDirectory() as tmp, capture_figures() as figures:
        draw(Path(tmp))
    return figures[0] if len(figures) == 1 else figures
