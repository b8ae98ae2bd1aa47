"""The data pipeline: scan a folder, bucket, cache latents and text-encoder outputs, batch by (epoch, index)."""

from .buckets import Crop, apply_crop, assign_bucket, make_buckets, plan_crop
from .cache import FeatureCache, latent_key, text_key
from .captions import process_caption
from .dataset import (
    CAPTION_EXTENSIONS,
    DataItem,
    DatasetError,
    DatasetReport,
    ReportLine,
    balance_regularization,
    scan_dataset,
    split_validation,
)
from .images import IMAGE_EXTENSIONS, ImageError, load_image
from .pipeline import Batch, TrainingData
from .sampler import BucketBatchSampler

__all__ = [
    "Batch", "BucketBatchSampler", "CAPTION_EXTENSIONS", "Crop", "DataItem", "DatasetError", "DatasetReport",
    "FeatureCache", "IMAGE_EXTENSIONS", "ImageError", "ReportLine", "TrainingData", "apply_crop", "assign_bucket",
    "balance_regularization",
    "latent_key", "load_image", "make_buckets", "plan_crop", "process_caption", "scan_dataset", "split_validation",
    "text_key",
]
