"""Evaluation: retrieval metrics and result tables."""

from cliplab.eval.retrieval import RetrievalResult, retrieval_metrics, retrieval_ranks, summarize_ranks
from cliplab.eval.tables import markdown_table, retrieval_markdown

__all__ = ["RetrievalResult", "retrieval_metrics", "retrieval_ranks", "summarize_ranks", "markdown_table",
           "retrieval_markdown"]
