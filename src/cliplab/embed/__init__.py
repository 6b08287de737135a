"""Embedding: frozen-tower feature extraction, the on-disk feature cache and dataset embedding."""

from cliplab.embed.cache import CachedFeatures, FeatureCache
from cliplab.embed.extract import embed_images, embed_texts
from cliplab.embed.pipeline import DatasetFeatures, encode_dataset, tower_features

__all__ = ["CachedFeatures", "FeatureCache", "embed_images", "embed_texts", "DatasetFeatures", "encode_dataset",
           "tower_features"]
