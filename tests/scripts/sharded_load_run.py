"""Load a sharded export on this torchrun's processes and predict given global batches; save
the logits in global sample order.  Used by tests/test_sharded_compress.py."""

import argparse

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.export import load_export
from shark_torchrec.sharded import Comm
from shark_torchrec.training import init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--export", required=True)
    p.add_argument("--batches", required=True, help="torch file: features and [(dense, lengths, values)]")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    model, info = load_export(args.export)
    spec = torch.load(args.batches, weights_only=False)
    comm = Comm()
    logits = []
    for dense, lengths, values in spec["batches"]:
        size = dense.shape[0]
        bounds = [size * r // env.world_size for r in range(env.world_size + 1)]
        lo, hi = bounds[env.rank], bounds[env.rank + 1]
        vals = []
        for i in range(len(spec["features"])):
            start = int(lengths[i, :lo].sum())
            vals.append(values[i][start:start + int(lengths[i, lo:hi].sum())])
        kjt = KeyedJaggedTensor.from_lengths_sync(spec["features"], torch.cat(vals), lengths[:, lo:hi].reshape(-1))
        logits.append(torch.cat(comm.all_gather_object(model.model(dense[lo:hi], kjt).reshape(-1))))
    counts = comm.all_gather_object(sorted(s.name for s in info["placement"].local(env.rank)))
    if env.rank == 0:
        torch.save({"logits": logits, "shards_per_rank": counts}, args.out)
    destroy_distributed(synchronize=True)
    exit_worker(0)


if __name__ == "__main__":
    main()
