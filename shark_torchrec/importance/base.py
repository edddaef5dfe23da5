"""The field-importance interface and helpers shared by every scorer."""

from __future__ import annotations

import abc
import math
from typing import Dict, Iterable, List, Sequence

from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table


class FieldImportance(abc.ABC):
    """Something that scores feature fields: higher means more important.

    Implementations: :class:`~shark_torchrec.importance.TaylorFieldImportance` (SHARK's
    F-Permutation), :class:`~shark_torchrec.importance.PermutationImportance` (exact) and
    :class:`~shark_torchrec.importance.RandomImportance`.
    """

    #: short name used in reports (``"shark-mean"``, ``"permutation"``, ...)
    name: str = "importance"

    @abc.abstractmethod
    def scores(self) -> Dict[str, float]:
        """Score per feature name."""

    def ranking(self) -> List[str]:
        """Feature names, most important first (ties broken by name, for determinism)."""
        s = self.scores()
        nan = [f for f, v in s.items() if math.isnan(v)]
        if nan:
            raise ValueError(f"{self.name}: no score for features {sorted(nan)} (no data seen)")
        return sorted(s, key=lambda f: (-s[f], f))

    def table_scores(self, tables: Sequence[EmbeddingBagConfig]) -> Dict[str, float]:
        """Score per table: the highest score of the features it serves (a table can only go
        when all its features go, so its most important feature decides)."""
        return table_scores(self.scores(), tables)


def table_scores(scores: Dict[str, float], tables: Sequence[EmbeddingBagConfig]) -> Dict[str, float]:
    """Score per table: the highest of its features' ``scores`` (a feature several of
    ``tables`` read is scored per table, under TorchRec's output name ``<feature>@<table>``).
    A feature with no score, or a NaN one (no data seen), raises naming it (``max`` of a NaN
    and a number depends on their order)."""
    out = {}
    for t, names in zip(tables, get_embedding_names_by_table(list(tables))):
        missing = [f for f in names if f not in scores]
        if missing:
            raise KeyError(f"table {t.name!r}: no score for features {missing}")
        nan = [f for f in names if math.isnan(scores[f])]
        if nan:
            raise ValueError(f"table {t.name!r}: no score for features {nan} (no data seen)")
        out[t.name] = max(scores[f] for f in names)
    return out


def embedding_collections(model: nn.Module) -> Dict[str, nn.Module]:
    """Every TorchRec ``EmbeddingBagCollection`` in ``model``, plain or sharded, by module path
    (any DMP/DDP ``module.`` prefixes removed)."""
    from torchrec.distributed.fp_embeddingbag import ShardedFeatureProcessedEmbeddingBagCollection

    found = {}
    feature_processed = []
    for name, module in model.named_modules():
        if isinstance(module, ShardedFeatureProcessedEmbeddingBagCollection):
            feature_processed.append(name)
        if isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection)):
            if any(name.startswith(p + ".") for p in feature_processed):
                # (TorchRec calls its inner collection's input_dist and compute directly, never
                # through the module: no forward hook would see a batch, every score NaN)
                raise ValueError(f"the collection at {name!r} is inside a sharded "
                                 "FeatureProcessedEmbeddingBagCollection, which no hook can track (not "
                                 "supported yet; an unsharded one is)")
            found[_strip(name)] = module
    if not found:
        raise ValueError("the model holds no EmbeddingBagCollection (plain or sharded)")
    return found


def collection_tables(module: nn.Module) -> List[EmbeddingBagConfig]:
    """Table configs of a plain or sharded ``EmbeddingBagCollection``."""
    if isinstance(module, ShardedEmbeddingBagCollection):
        return list(module._embedding_bag_configs)
    return list(module.embedding_bag_configs())


def _strip(name: str) -> str:
    """``name`` without the prefixes of DistributedModelParallel (``_dmp_wrapped_module.``)
    and DDP (``module.``): the same path sharded or not."""
    while True:
        for prefix in ("_dmp_wrapped_module.", "module."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            return name


def all_features(tables: Iterable[EmbeddingBagConfig]) -> List[str]:
    return [f for t in tables for f in t.feature_names]
