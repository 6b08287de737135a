"""Evaluation: retrieval metrics, zero-shot classification, classification metrics, linear probes."""

from cliplab.eval.classification import classification_metrics, top_k_accuracy
from cliplab.eval.probe import TorchProbeConfig, fit_logistic_probe, fit_torch_probe, probe_vs_zeroshot
from cliplab.eval.retrieval import RetrievalResult, retrieval_metrics, retrieval_ranks, summarize_ranks
from cliplab.eval.tables import markdown_table, retrieval_markdown
from cliplab.eval.zeroshot import ZeroShotClassifier, resolve_templates, template_sets, zeroshot_experiment

__all__ = [
    "classification_metrics", "top_k_accuracy", "TorchProbeConfig", "fit_logistic_probe", "fit_torch_probe",
    "probe_vs_zeroshot", "RetrievalResult", "retrieval_metrics", "retrieval_ranks", "summarize_ranks",
    "markdown_table", "retrieval_markdown", "ZeroShotClassifier", "resolve_templates", "template_sets",
    "zeroshot_experiment",
]
