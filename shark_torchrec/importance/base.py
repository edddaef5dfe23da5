"""The field-importance interface and helpers shared by every scorer."""

from __future__ import annotations

import abc
import math
from typing import Dict, Iterable, List, Sequence

from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection


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
    out = {}
    for t in tables:
        known = [scores[f] for f in t.feature_names if f in scores]
        if len(known) != len(t.feature_names):
            missing = [f for f in t.feature_names if f not in scores]
            raise KeyError(f"table {t.name!r}: no score for features {missing}")
        out[t.name] = max(known)
    return out


def embedding_collections(model: nn.Module) -> Dict[str, nn.Module]:
    """Every TorchRec ``EmbeddingBagCollection`` in ``model``, plain or sharded, by module path
    (any DMP/DDP ``module.`` prefixes removed)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection)):
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
    while name.startswith("module."):  # DistributedModelParallel / DDP wrappers
        name = name[len("module.") :]
    return name


def all_features(tables: Iterable[EmbeddingBagConfig]) -> List[str]:
    return [f for t in tables for f in t.feature_names]
