"""Row priorities sharded over this torchrun's ranks: several channels, requests for any rows,
a save; the results for tests/test_row_priority.py to compare with one process."""

import argparse

import torch

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.importance import RowPriority
from shark_torchrec.sharded import Comm
from shark_torchrec.training import init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker

CHANNELS = {"pos": (1.0, 0.0, 0.9), "neg": (0.0, 1.0, 0.9), "plain": (1.0, 0.2, 1.0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--save", required=True)
    args = p.parse_args()
    env = init_distributed("cpu")
    cfg = SyntheticConfig.default(num_fields=3, num_informative=1, cardinality=41, multi_hot_fields=1,
                                  max_hot=4, seed=4)
    from torchrec import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=41, feature_names=[f"cat_{i}"])
              for i in range(3)]
    rp = RowPriority(tables, channels=CHANNELS, flush_every=3)
    ds = SyntheticClickDataset(cfg, 16 // env.world_size, 10, rank=env.rank, world_size=env.world_size)
    for b in ds:
        rp.update(b.sparse_features, b.labels)
    # each rank asks for other rows (some span both ranks' shares)
    requests = [("t0", 5, 30), ("t2", 0, 41)] if env.rank == 0 else [("t1", 17, 10), ("t0", 40, 1)]
    answers = rp.rows(requests, {"pos": 1.0, "neg": 0.25})
    comm = Comm()
    gathered = comm.all_gather_object((requests, answers, rp.memory_bytes))
    full = {c: rp.priorities(c) for c in CHANNELS}
    rp.save(args.save)
    if env.rank == 0:
        torch.save({"gathered": gathered, "full": full, "step": rp.step}, args.out)
    destroy_distributed(synchronize=True)
    exit_worker(0)


if __name__ == "__main__":
    main()
