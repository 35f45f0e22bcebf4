"""Datasets: raw layouts, the synthetic generator, preparation and the prepared dataset.

``prepare`` and ``PreparedDataset`` are imported lazily so that light users (the CLI's help) do
not pay for torch.
"""

from typing import Any

__all__ = ["DatasetError", "PrepareError", "PreparedDataset", "prepare"]


def __getattr__(name: str) -> Any:
    if name in ("DatasetError", "PreparedDataset"):
        from qrs.data import dataset

        return getattr(dataset, name)
    if name in ("PrepareError", "prepare"):
        from qrs.data import prepare as module

        return getattr(module, name)
    raise AttributeError(name)
