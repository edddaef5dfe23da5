"""shark-torchrec: SHARK embedding compression for TorchRec.

Subpackages:
    data: click-log readers (Criteo, schema-driven delimited files, Avazu preset) and the
        synthetic click-data generator, all producing TorchRec ``Batch`` objects.
    training: the DLRM training loop on ``DistributedModelParallel`` used by the recipes.
"""

__version__ = "0.1.0"
