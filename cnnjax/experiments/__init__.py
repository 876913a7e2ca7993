"""Experiments: sweeps of training trials, EfficientNet compound scaling, the classic claims."""
