"""Human-readable tables for retrieval results."""

from __future__ import annotations

from cliplab.eval.evaluators import RetrievalEvaluator

TABLE_COLUMNS = RetrievalEvaluator.columns  # the retrieval evaluator's columns


def _fmt(key: str, value: float) -> str:
    return f"{value:.3f}" if key.endswith("mrr") else f"{value:.1f}" if "rank" in key else f"{value:.2f}"


def retrieval_rows(results: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    header = ["model"] + [label for _, label in TABLE_COLUMNS]
    rows = [[name] + [_fmt(k, m[k]) for k, _ in TABLE_COLUMNS] for name, m in results.items()]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def retrieval_markdown(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    text = f"### {title}\n\n" if title else ""
    return text + markdown_table(*retrieval_rows(results))
