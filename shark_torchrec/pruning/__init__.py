"""Field pruning: plans chosen from field scores, and applying them to TorchRec models.

* :func:`choose_plan` / :class:`PruningPlan` — keep ``k`` fields, drop a fraction, or reach a
  byte target; protected fields; JSON files validated against the model.
* :func:`prune_dlrm`, :func:`prune_embedding_collection`, :func:`prune_model`,
  :class:`ZeroFilledEmbeddingBagCollection` — applying a plan.
* :class:`MeanFilledSparseArch`, :func:`field_means` — pruning by mean replacement (a pruned
  field reads its mean pooled embedding; ``prune_dlrm(..., means=...)``).
* :func:`filter_features`, :func:`filter_batch`, :class:`PrunedFeatureFilter` (also
  ``plan.filter_features`` / ``plan.filter_batch``) — the data's batches for a pruned model.
"""

from shark_torchrec.pruning.apply import (
    ZeroFilledEmbeddingBagCollection,
    prune_dlrm,
    prune_embedding_collection,
    prune_model,
    pruned_tables,
)
from shark_torchrec.pruning.mean_fill import MeanFilledSparseArch, field_means
from shark_torchrec.pruning.inputs import PrunedFeatureFilter, filter_batch, filter_features
from shark_torchrec.pruning.plan import PruningPlan, choose_plan, table_bytes

__all__ = [
    "MeanFilledSparseArch",
    "PrunedFeatureFilter",
    "PruningPlan",
    "ZeroFilledEmbeddingBagCollection",
    "choose_plan",
    "field_means",
    "filter_batch",
    "filter_features",
    "prune_dlrm",
    "prune_embedding_collection",
    "prune_model",
    "pruned_tables",
    "table_bytes",
]
