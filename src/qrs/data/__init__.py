"""Datasets: raw layouts, the synthetic generator, preparation and the prepared dataset.

``prepare`` and ``PreparedDataset`` are imported lazily so that light users (the CLI's help,
``qrs synth``) do not pay for scikit-learn and torch.
"""

import importlib
from typing import Any

__all__ = ["DatasetError", "PrepareError", "PreparedDataset", "prepare"]
_HOMES = {"DatasetError": "dataset", "PreparedDataset": "dataset", "PrepareError": "preparation", "prepare": "preparation"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'qrs.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qrs.data.{_HOMES[name]}"), name)
