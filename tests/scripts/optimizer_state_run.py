"""Optimizers the trainer gives every parameter, and their state across a resume (one process
under torchrun; tests/test_checkpoint_resume.py reads its JSON):

* a run with the Adam dense optimizer stopped after 3 steps and resumed in a fresh trainer ends
  where the uninterrupted 6-step run ends (Adam's moments and step count are loaded, not
  restarted: a fresh Adam has no state for DCP to load into);
* a table sharded data-parallel takes the embedding optimizer's step at the embedding learning
  rate, as a table-wise one does (against an unsharded DLRMTrain's gradient).
"""

import argparse
import json
import tempfile

import torch
from torchrec.distributed.planner import ParameterConstraints

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.planning import AllShardingTypesEBCSharder
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.distributed import destroy_distributed
from shark_torchrec.training.loop import TrainingLoop
from shark_torchrec.training.model import build_dlrm_train

CFG = SyntheticConfig.default(num_fields=3, num_informative=2, cardinality=60, seed=0)
MODEL = DLRMConfig(feature_names=CFG.feature_names, num_embeddings_per_feature=CFG.num_embeddings_per_feature,
                   embedding_dim=8, dense_in_features=CFG.num_dense, dense_arch_layer_sizes=(16, 8),
                   over_arch_layer_sizes=(16, 1))


def batches(epoch, start):
    return SyntheticClickDataset(CFG, 32, 6, start_batch=start)


def local(value) -> torch.Tensor:
    return value.local_shards()[0].tensor.detach().clone() if hasattr(value, "local_shards") else value.detach().clone()


def flat(obj, prefix="", into=None) -> dict:
    into = {} if into is None else into
    if isinstance(obj, dict):
        for k, v in obj.items():
            flat(v, f"{prefix}.{k}", into)
    elif isinstance(obj, torch.Tensor) or hasattr(obj, "local_shards"):
        into[prefix] = local(obj).double()
    elif isinstance(obj, (int, float)):
        into[prefix] = torch.tensor(float(obj), dtype=torch.float64)
    return into


def adam_resume(env, root: str) -> dict:
    oc = OptimConfig(dense_optimizer="adam", learning_rate=0.01)
    fp = {"model": "adam"}
    whole = DLRMTrainer(MODEL, oc, env, 32, seed=0)
    TrainingLoop(whole, CheckpointManager(root + "/whole", fp), batches, 1, 32).run()
    ckpt = CheckpointManager(root + "/part", fp)
    TrainingLoop(DLRMTrainer(MODEL, oc, env, 32, seed=0), ckpt, batches, 1, 32).run(max_steps=3)
    resumed = DLRMTrainer(MODEL, oc, env, 32, seed=0)
    loop = TrainingLoop(resumed, ckpt, batches, 1, 32)
    assert loop.resume()
    loop.run()
    a, b = flat(whole.state_dict()), flat(resumed.state_dict())
    return {"keys_differ": sorted(set(a) ^ set(b)), "adam_keys": sum(".exp_avg" in k for k in a),
            "max_diff": max(float((a[k] - b[k]).abs().max()) for k in a if k in b)}


def data_parallel_lr(env) -> dict:
    oc = OptimConfig(embedding_optimizer="sgd", dense_optimizer="sgd", learning_rate=0.01, embedding_learning_rate=1.0)
    out = {}
    for kind in ("table_wise", "data_parallel"):
        constraints = {t.name: ParameterConstraints(sharding_types=[kind]) for t in MODEL.tables()}
        t = DLRMTrainer(MODEL, oc, env, 32, seed=0, constraints=constraints, sharders=[AllShardingTypesEBCSharder()])
        before = {k.removeprefix("module."): local(v) for k, v in t.model.state_dict().items()}
        batch = next(iter(batches(0, 0)))
        t.train_step(batch)
        after = {k.removeprefix("module."): local(v) for k, v in t.model.state_dict().items()}
        ref = build_dlrm_train(MODEL, torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
        ref.load_state_dict(before, strict=False)
        ref(batch)[0].backward()
        grads = dict(ref.named_parameters())
        errs = {lr: max(float((after[k] - (before[k] - lr * grads[k].grad)).abs().max())
                        for k in before if "embedding_bags" in k) for lr in (1.0, 0.01)}
        out[kind] = {"embedding_lr": errs[1.0], "dense_lr": errs[0.01]}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        result = {"adam": adam_resume(env, root), "data_parallel": data_parallel_lr(env)}
    with open(args.out, "w") as f:
        json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
