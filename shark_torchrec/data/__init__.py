"""Click-log data for TorchRec: readers and the synthetic generator.

Every source is a ``torch.utils.data.IterableDataset`` of TorchRec
``torchrec.datasets.utils.Batch`` objects (dense features, a ``KeyedJaggedTensor`` of sparse
features, labels), split between ranks and data-loader workers the same way
(:mod:`shark_torchrec.data.batching`):

* :class:`ClickLogDataset` streams delimited files described by a :class:`ClickLogSchema`;
  :data:`CRITEO_SCHEMA` (Criteo Kaggle / 1TB) and :data:`AVAZU_SCHEMA` are presets.
* :class:`SyntheticClickDataset` generates Zipf-distributed click data with planted
  informative fields (the built-in default); :func:`criteo_config` is a Criteo-shaped benchmark
  layout whose true field and row importances are known (:func:`true_field_importance`,
  :func:`true_row_importance`).
"""

from shark_torchrec.data.batching import local_slice, make_batch
from shark_torchrec.data.click_log import (
    ClickLogDataset,
    MalformedLineError,
    avazu_dataset,
    criteo_dataset,
)
from shark_torchrec.data.loader import make_dataloader
from shark_torchrec.data.schema import (
    AVAZU_SCHEMA,
    CRITEO_SCHEMA,
    ClickLogSchema,
)
from shark_torchrec.data.synthetic import (
    SyntheticClickDataset,
    SyntheticConfig,
    SyntheticField,
    criteo_config,
    true_field_importance,
    true_row_importance,
)

__all__ = [
    "AVAZU_SCHEMA",
    "CRITEO_SCHEMA",
    "ClickLogDataset",
    "ClickLogSchema",
    "MalformedLineError",
    "SyntheticClickDataset",
    "SyntheticConfig",
    "SyntheticField",
    "avazu_dataset",
    "criteo_config",
    "criteo_dataset",
    "local_slice",
    "make_batch",
    "make_dataloader",
    "true_field_importance",
    "true_row_importance",
]
