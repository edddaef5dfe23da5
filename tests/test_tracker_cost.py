"""A guard on what the pipeline's trackers add to a training step, without timing anything:
the operators they run and the memory they allocate, counted by torch's profiler.

The tracker regression of issue 20 (+30% per step) came from a float64 copy of every step's
gradients and a dozen small tensor ops per feature: either shows up here.  Budgets: the
trackers add at most 120 aten operators per step (they add 80 now: a few per feature is
gone), and allocate less than half of a float64 copy of the step's gradients."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM, DLRMTrain

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.importance import RowPriority, TaylorFieldImportance
from shark_torchrec.cli_run import parse_pipeline
from shark_torchrec.pipeline import _row_counters
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.training.model import DLRMConfig

B, FIELDS, DIM = 256, 8, 16


def _per_step(model, batches, trackers):
    """(aten operators, bytes allocated) per training step with ``trackers`` attached."""
    for t in trackers:
        t.attach(model) if isinstance(t, RowPriority) else t.attach()
    try:
        loss, _ = model(batches[0])
        loss.backward()  # warm up: layouts, kernels
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for b in batches[1:]:
                loss, _ = model(b)
                loss.backward()
    finally:
        for t in trackers:
            t.detach()
    events = list(prof.events())
    steps = len(batches) - 1
    return (sum(1 for e in events if e.name.startswith("aten::")) / steps,
            sum(max(0, e.cpu_memory_usage) for e in events) / steps)


@pytest.mark.parametrize("baseline", ["mean", "zero", "shuffle"])
def test_the_trackers_add_few_operators_and_no_big_allocation(baseline) -> None:
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here (the fallback path is not budgeted)")
    cfg = SyntheticConfig.default(num_fields=FIELDS, num_informative=3, cardinality=1000, multi_hot_fields=2,
                                  max_hot=4, seed=1)
    config = DLRMConfig(feature_names=cfg.feature_names, num_embeddings_per_feature=cfg.num_embeddings_per_feature,
                        embedding_dim=DIM, dense_arch_layer_sizes=(32, DIM), over_arch_layer_sizes=(32, 1))
    torch.manual_seed(0)
    model = DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=config.tables()),
                           dense_in_features=cfg.num_dense, dense_arch_layer_sizes=[32, DIM],
                           over_arch_layer_sizes=[32, 1]))
    batches = [SyntheticClickDataset(cfg, B, 4).global_batch(g) for g in range(4)]
    ops0, bytes0 = _per_step(model, batches, [])
    # what recipes/shark_dlrm.py attaches, run inline so the profiler sees every operator
    taylor = TaylorFieldImportance(model, baseline=baseline, background=False)
    counters = RowPriority(config.tables(), channels=_row_counters(parse_pipeline([]).quant), background=False)
    ops1, bytes1 = _per_step(model, batches, [taylor, counters])
    gradients_in_float64 = B * FIELDS * DIM * 8
    assert ops1 - ops0 <= 120, (ops0, ops1)
    extra = bytes1 - bytes0
    if baseline == "shuffle":  # the permuted batch is a copy of the pooled embeddings, by design
        extra -= B * FIELDS * DIM * 4
    assert extra < gradients_in_float64 / 2, (bytes0, bytes1)
    assert taylor.samples_seen() == {f: 4 * B for f in cfg.feature_names}  # it did track (warm-up too)
