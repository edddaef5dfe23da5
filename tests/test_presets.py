"""Defaults settled when the flags are parsed: data presets bring their tuned defaults only for
the flags a command line leaves unset; the quantized rows' alignment follows the device."""

import torch

from shark_torchrec.cli_run import PRESET_DEFAULTS, parse_pipeline, parse_prune
from shark_torchrec.pipeline import row_alignment
from shark_torchrec.run_config import flat


def build(argv):
    return flat(parse_pipeline(argv))


def test_preset_defaults_fill_only_unset_flags() -> None:
    a = build(["--data", "ml100k"])
    for dest, value in PRESET_DEFAULTS["ml100k"].items():
        assert a[dest] == value, dest
    b = build(["--data", "ml100k", "--embedding_dim=16", "--dense_arch", "64,16", "--keep_fields", "4"])
    assert b["embedding_dim"] == 16 and b["dense_arch_layer_sizes"] == [64, 16]  # given, also abbreviated
    assert b["drop_score_share"] is None and b["keep_fields"] == 4  # --keep_fields excludes the preset's criterion
    assert b["epochs"] == 3
    c = build(["--data", "synthetic_criteo"])
    assert c["batch_size"] == 1024 and c["drop_score_share"] == 0.005 and c["drop_fraction"] is None
    e = build(["--data", "synthetic_criteo", "--drop_fraction", "0.1"])
    assert e["drop_fraction"] == 0.1 and e["drop_score_share"] is None
    d = build([])  # no preset for the default synthetic data: the pipeline prunes a quarter of the fields
    assert d["batch_size"] == 256 and d["embedding_dim"] == 16 and d["drop_fraction"] == 0.25
    # prune_dlrm.py: a --byte_target excludes the preset's criterion too
    p = parse_prune(["--data", "ml100k", "--from_run", ".", "--byte_target", "1000"]).prune
    assert p.byte_target == 1000 and p.drop_score_share is None


def test_row_alignment_auto_follows_the_device_as_torchrec_inference_does() -> None:
    auto = parse_pipeline([]).quant
    assert row_alignment(auto, torch.device("cpu")) == 1
    assert row_alignment(auto, torch.device("cuda")) == 16
    pinned = parse_pipeline(["--row_alignment", "16"]).quant
    assert row_alignment(pinned, torch.device("cpu")) == 16
