"""Training DLRM-style models on TorchRec: process groups, model building, sharding with the
planner and ``DistributedModelParallel``, deterministic initialisation, the train/eval loop
and checkpoints."""

from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.distributed import DistEnv, destroy_distributed, init_distributed
from shark_torchrec.training.model import EBC_FQN, DLRMConfig, build_dlrm_train
from shark_torchrec.training.trainer import DLRMTrainer, OptimConfig

__all__ = [
    "CheckpointManager",
    "DLRMConfig",
    "DLRMTrainer",
    "DistEnv",
    "EBC_FQN",
    "OptimConfig",
    "build_dlrm_train",
    "destroy_distributed",
    "init_distributed",
]
