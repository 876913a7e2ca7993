"""Datasets (TFDS, read without TensorFlow), preprocessing and input pipelines."""

from cnnjax.data.datasets import (ArraySource, DatasetError, DatasetInfo, data_source,
                                  embedded_names, info, prepare, resolve_data_dir)
from cnnjax.data.pipeline import (EvalBatches, Sharding, TrainBatches, default_workers,
                                  eval_iterator, prefetch_to_device, train_iterator)
from cnnjax.data.preprocess import Preprocessing

__all__ = [
    "ArraySource", "DatasetError", "DatasetInfo", "EvalBatches", "Preprocessing", "Sharding",
    "TrainBatches", "data_source", "default_workers", "embedded_names", "eval_iterator", "info", "prepare",
    "prefetch_to_device", "resolve_data_dir", "train_iterator",
]
