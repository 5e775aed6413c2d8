"""Datasets (uint8 images + labels + indices) and the multi-view augmentation pipelines."""
