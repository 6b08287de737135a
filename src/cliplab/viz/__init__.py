"""Figures (PNG + the data behind them) and the self-contained HTML run report."""

from cliplab.viz.classification import confusion_matrix_plot, top5_bars
from cliplab.viz.curves import recall_at_k, sweep_overlay, training_curves
from cliplab.viz.galleries import image_to_text_gallery, text_to_image_gallery
from cliplab.viz.maps import class_map, modality_map, reduce_2d
from cliplab.viz.report import build_report

__all__ = ["confusion_matrix_plot", "top5_bars", "recall_at_k", "sweep_overlay", "training_curves",
           "image_to_text_gallery", "text_to_image_gallery", "class_map", "modality_map", "reduce_2d", "build_report"]
