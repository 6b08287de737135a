"""Datasets: image-caption pairs, labelled images and image decoding."""

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
from cliplab.data.images import ImageArrays, ImageFiles, ImageSet, load_rgb
from cliplab.data.labelled import LabelledImages, load_labelled, read_cifar, read_image_folder, read_labelled_csv

__all__ = [
    "CaptionDataset", "CaptionRecord", "SkipReport", "load_caption_dataset", "read_coco", "read_flickr8k",
    "read_karpathy", "read_pairs", "ImageArrays", "ImageFiles", "ImageSet", "load_rgb", "LabelledImages",
    "load_labelled", "read_cifar", "read_image_folder", "read_labelled_csv",
]
