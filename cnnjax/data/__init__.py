"""Datasets (TFDS, read without TensorFlow), preprocessing and input pipelines."""

from cnnjax.data.datasets import (ArraySource, DatasetError, DatasetInfo, data_source,
                                  embedded_names, info, prepare, resolve_data_dir)
from cnnjax.data.device_augment import DeviceAugment
from cnnjax.data.pipeline import (EvalBatches, ResidentBatches, Sharding, TrainBatches,
                                  default_augment_on, default_workers, eval_iterator,
                                  prefetch_to_device, train_iterator)
from cnnjax.data.preprocess import Preprocessing

__all__ = [
    "ArraySource", "DatasetError", "DatasetInfo", "DeviceAugment", "EvalBatches",
    "Preprocessing", "ResidentBatches", "Sharding", "TrainBatches", "data_source",
    "default_augment_on", "default_workers", "embedded_names", "eval_iterator", "info", "prepare",
    "prefetch_to_device", "resolve_data_dir", "train_iterator",
]
