"""A DMP-sharded FeatureProcessedEmbeddingBagCollection (position-weighted features) and the
Taylor tracker: TorchRec calls the inner collection's input_dist and compute directly, so no
forward hook sees a batch (every score was NaN, silently).  The tracker refuses it, naming the
collection; the unsharded one is scored.  Used by tests/test_importance_distributed.py."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

from shark_torchrec.importance import TaylorFieldImportance

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=10, feature_names=[f"f{i}"])
          for i in range(2)]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fp = FeatureProcessedEmbeddingBagCollection(EmbeddingBagCollection(tables=TABLES, is_weighted=True),
                                                         PositionWeightedModuleCollection({"f0": 3, "f1": 3}))
        self.lin = nn.Linear(8, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        d = self.fp(kjt).to_dict()
        return self.lin(torch.cat([d["f0"], d["f1"]], 1)).squeeze(-1)


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    m = Model()
    kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.arange(1, 9), torch.ones(8, dtype=torch.long))
    plain = TaylorFieldImportance(m, baseline="zero", background=False)
    with plain:
        F.binary_cross_entropy_with_logits(m(kjt), torch.tensor([0.0, 1.0, 0.0, 1.0])).backward()
    assert all(v > 0 for v in plain.scores().values()), plain.scores()
    sharder = FeatureProcessedEmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(m.fp, per_param_sharding={"t0": table_wise(rank=0),
                                                                    "t1": table_wise(rank=world - 1)},
                                          local_size=world, world_size=world, device_type="cpu", sharder=sharder)
    dmp = DistributedModelParallel(m, device=torch.device("cpu"), plan=ShardingPlan({"fp": plan}), sharders=[sharder])
    try:
        TaylorFieldImportance(dmp, baseline="zero", background=False)
    except ValueError as e:
        assert "inside a sharded FeatureProcessedEmbeddingBagCollection" in str(e), e
        print("refused:", e)
    else:
        raise AssertionError("the tracker took a sharded feature-processed collection it cannot see")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
