"""The search app: index a photo folder (``PhotoIndex``), query it by text or image, serve it over HTTP."""

from cliplab.serve.index import BuildReport, IndexBuilder, PhotoIndex
from cliplab.serve.query import QueryEncoder, QueryTerm, parse_cli_query

__all__ = ["BuildReport", "IndexBuilder", "PhotoIndex", "QueryEncoder", "QueryTerm", "parse_cli_query"]
