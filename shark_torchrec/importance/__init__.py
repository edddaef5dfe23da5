"""Importance: which feature fields (F-Permutation) and which embedding rows (F-Quantization)
a model needs.

* :class:`TaylorFieldImportance` — SHARK's score, accumulated by hooks on plain and sharded
  ``EmbeddingBagCollection``s during ordinary training steps (``mean``, ``shuffle`` and
  ``zero`` baselines).
* :class:`PermutationImportance` and :class:`RandomImportance` — references behind the same
  :class:`FieldImportance` interface.
* :class:`RowPriority` — per-row priorities for F-Quantization (usage, labels, time decay).
"""

from shark_torchrec.importance.base import FieldImportance, embedding_collections, table_scores
from shark_torchrec.importance.reference import (
    PermutationImportance,
    RandomImportance,
    dlrm_per_sample_loss,
    shuffle_feature,
)
from shark_torchrec.importance.row_priority import RowPriority
from shark_torchrec.importance.taylor import BASELINES, TaylorFieldImportance

__all__ = [
    "BASELINES",
    "FieldImportance",
    "PermutationImportance",
    "RandomImportance",
    "RowPriority",
    "TaylorFieldImportance",
    "dlrm_per_sample_loss",
    "embedding_collections",
    "shuffle_feature",
    "table_scores",
]
