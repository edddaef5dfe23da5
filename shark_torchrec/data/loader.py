"""The ``torch.utils.data`` pipeline around the datasets of this package."""

from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset


def make_dataloader(
    dataset: IterableDataset, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A ``DataLoader`` over a dataset that already yields whole ``Batch`` objects.

    ``batch_size=None`` because batching happens inside the dataset (so that global batches
    can be split between ranks); with workers, batches keep their order (see
    :mod:`shark_torchrec.data.batching`).
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
