"""Click-log data for TorchRec: readers and the synthetic generator.

Every source is a ``torch.utils.data.IterableDataset`` of TorchRec
``torchrec.datasets.utils.Batch`` objects (dense features, a ``KeyedJaggedTensor`` of sparse
features, labels), split between ranks and data-loader workers the same way
(:mod:`shark_torchrec.data.batching`):

* :class:`ClickLogDataset` streams delimited files described by a :class:`ClickLogSchema`;
  :data:`CRITEO_SCHEMA` (Criteo Kaggle / 1TB) and :data:`AVAZU_SCHEMA` are presets, and
  :func:`load_schema_file` reads your own from a YAML/JSON file (:mod:`.schema_file`).
  :class:`LineSplit` splits one set of files into train/validation/test by a seeded hash.
* :mod:`shark_torchrec.data.movielens` converts MovieLens-100K (fetched with pip) into click
  logs plus their schema file (``--data ml100k``).
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
from shark_torchrec.data.schema_file import SchemaFile, SchemaFileError, load_schema_file
from shark_torchrec.data.splits import LineSplit
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
    "LineSplit",
    "MalformedLineError",
    "SchemaFile",
    "SchemaFileError",
    "SyntheticClickDataset",
    "SyntheticConfig",
    "SyntheticField",
    "avazu_dataset",
    "criteo_config",
    "criteo_dataset",
    "load_schema_file",
    "local_slice",
    "make_batch",
    "make_dataloader",
    "true_field_importance",
    "true_row_importance",
]
