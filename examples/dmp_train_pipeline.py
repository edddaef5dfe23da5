"""SHARK on a model you build yourself: TorchRec's DLRM sharded by DistributedModelParallel,
trained with TorchRec's TrainPipelineSparseDist, fields scored and rows prioritised while it
trains, then compressed where its shards lie and used for prediction.

    torchrun --standalone --nproc_per_node 2 examples/dmp_train_pipeline.py --out runs/example

Only TorchRec builds the model, the sharding and the training loop; shark-torchrec adds three
things: ``TaylorFieldImportance(dmp).attach()`` (field scores from the gradients the training
steps compute anyway), ``RowPriority(tables).attach(dmp)`` (row priorities from each step's
ids and labels) and ``quantize_sharded_dlrm`` (row-wise mixed precision, each rank converting
its own shards).  Writes ``OUT/result.json`` (rank 0) with the field scores, the priorities'
totals, the bytes and the compressed model's test AUC next to the trained one's.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, make_dataloader
from shark_torchrec.importance import RowPriority, TaylorFieldImportance
from shark_torchrec.quant import RowwiseQuantConfig
from shark_torchrec.sharded import quantize_sharded_dlrm
from shark_torchrec.training.distributed import exit_worker


def auc(predict, batches) -> float:
    """Test AUC over every rank's batches (each rank scores its own; the metric syncs)."""
    metric = BinaryAUROC()
    with torch.no_grad():
        for logits, labels in predict(batches):
            metric.update(torch.sigmoid(logits.reshape(-1)), labels.long())
    return float(metric.compute())


def through_pipeline(pipeline):
    """Predictions of the trained model: once a TrainPipelineSparseDist has rewritten the
    model's embedding lookups, they run through the pipeline (in eval mode: no backward, no
    optimizer step), as TorchRec's DLRM example evaluates."""
    def predict(batches):
        it = iter(batches)
        while True:
            try:
                _, logits, labels = pipeline.progress(it)  # the pipeline returns DLRMTrain's (loss, logits, labels)
            except StopIteration:
                return
            yield logits, labels
    return predict


def directly(model):
    """Predictions of a DLRMTrain called as usual: ``model.model(dense, sparse)`` gives logits."""
    def predict(batches):
        for b in batches:
            yield model.model(b.dense_features, b.sparse_features), b.labels
    return predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example")
    p.add_argument("--fields", type=int, default=8)
    p.add_argument("--rows", type=int, default=2000, help="rows per table")
    p.add_argument("--batch_size", type=int, default=256, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    dist.init_process_group("gloo")  # CPU; on GPUs: "nccl" and device cuda:<local rank>
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    torch.set_num_threads(1)

    # Data: generated click logs with a known logit (any iterable of TorchRec Batches works).
    data = SyntheticConfig.default(num_fields=args.fields, num_informative=3, cardinality=args.rows, seed=1)
    train = SyntheticClickDataset(data, args.batch_size, args.steps, rank=rank, world_size=world)
    test = list(make_dataloader(SyntheticClickDataset(data, args.batch_size, 8, rank=rank, world_size=world,
                                                      batch_offset=10**6)))  # held-out batches

    # The model, as TorchRec's examples build it: tables on the meta device, DMP shards them.
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=n, feature_names=[f])
              for f, n in zip(data.feature_names, data.num_embeddings_per_feature)]
    torch.manual_seed(0)
    model = DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                           dense_in_features=data.num_dense, dense_arch_layer_sizes=[32, 16],
                           over_arch_layer_sizes=[32, 1], dense_device=device))
    apply_optimizer_in_backward(torch.optim.Adagrad, model.model.sparse_arch.parameters(), {"lr": 0.05})
    dmp = DistributedModelParallel(model, device=device)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])

    # SHARK's trackers: hooks on the sharded model, fed by the steps the pipeline runs.
    fields = TaylorFieldImportance(dmp, baseline="mean").attach()
    rows = RowPriority(tables).attach(dmp)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    batches = iter(make_dataloader(train))
    dmp.train()
    while True:
        try:
            pipeline.progress(batches)
        except StopIteration:
            break
    fields.detach()
    rows.detach()
    scores = fields.scores()  # {feature: score}, the same on every rank
    dmp.eval()
    trained_auc = auc(through_pipeline(pipeline), test)

    # Compress where the shards lie: 15% of the fp32 bytes, rows by their priorities (the least
    # important read as one of their table's centroids), 1-byte rows (a model served on CPU).
    config = RowwiseQuantConfig(budget_fraction=0.15, tiers=("fp16", "int8", "int4", "int2", "shared"),
                                row_alignment=1)
    compressed, assignment = quantize_sharded_dlrm(dmp, config, priorities=rows)
    compressed_auc = auc(directly(compressed), test)
    fp32 = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        result = {"field_scores": scores, "informative_fields": list(data.informative),
                  "rows_per_tier": assignment.rows_per_tier, "budget_bytes": assignment.details["budget_bytes"],
                  "fp32_bytes": fp32, "trained_auc": trained_auc, "compressed_auc": compressed_auc}
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        top = sorted(scores, key=scores.get, reverse=True)[:3]
        print(f"top fields {top} (informative: {result['informative_fields']}); test AUC {trained_auc:.4f} "
              f"trained, {compressed_auc:.4f} compressed to 15% of the embedding bytes")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # End without Python's finalization: TorchRec objects can hold the gloo group's C++ state
    # past destroy_process_group, and tearing it down at exit can abort a finished job
    # ("terminate called without an active exception"; see exit_worker).
    exit_worker(0)
