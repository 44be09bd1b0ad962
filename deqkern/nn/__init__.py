"""Drop-in implicit layers: every one takes `forward(x, z0=None)`, returns z* and keeps its solver statistics in
`last_info`.

- dense.py: `DEQLinear`, the dense layer on the fused solve; dense_layer.py: the base every dense layer shares;
- deq.py: `DEQ`, a deep equilibrium layer around any f(z, x), on a tensor state or a tuple of them;
- multiscale.py: `MultiscaleDEQ` (the MDEQ: one state per resolution) and `MultiscaleDEQClassifier`;
- certified/: layers whose fixed point provably exists, is unique and is reached (dense and convolutional).
"""
from .certified import (LinfContractiveConvDEQ, LinfContractiveDEQ, LipschitzConvDEQ, LipschitzDEQ,
                        LipschitzMultiscaleDEQ, LipschitzMultiscaleDEQClassifier, PositiveConcaveConvDEQ,
                        PositiveConcaveDEQ)
from .dense import DEQLinear
from .deq import DEQ
from .multiscale import MultiscaleDEQ, MultiscaleDEQClassifier

__all__ = [
    "DEQ",
    "DEQLinear",
    "LinfContractiveConvDEQ",
    "LinfContractiveDEQ",
    "LipschitzConvDEQ",
    "LipschitzDEQ",
    "LipschitzMultiscaleDEQ",
    "LipschitzMultiscaleDEQClassifier",
    "MultiscaleDEQ",
    "MultiscaleDEQClassifier",
    "PositiveConcaveConvDEQ",
    "PositiveConcaveDEQ",
]
