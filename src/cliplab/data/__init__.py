"""Datasets: image-caption pairs and image decoding."""

from cliplab.data.captions import (
    CaptionDataset,
    CaptionRecord,
    SkipReport,
    load_caption_dataset,
    read_coco,
    read_flickr8k,
    read_karpathy,
    read_pairs,
)
from cliplab.data.images import load_rgb

__all__ = [
    "CaptionDataset", "CaptionRecord", "SkipReport", "load_caption_dataset", "read_coco", "read_flickr8k",
    "read_karpathy", "read_pairs", "load_rgb",
]
