"""Drop-in implicit layers: every one takes `forward(x, z0=None)`, returns z* and keeps its solver statistics in
`last_info`.

- dense.py: `DEQLinear`, the dense layer on the fused solve; dense_layer.py: the base every dense layer shares;
- deq.py: `DEQ`, a deep equilibrium layer around any f(z, x);
- certified/: layers whose fixed point provably exists, is unique and is reached (dense and convolutional).
"""
from .certified import (LinfContractiveConvDEQ, LinfContractiveDEQ, LipschitzConvDEQ, LipschitzDEQ,
                        PositiveConcaveConvDEQ, PositiveConcaveDEQ)
from .dense import DEQLinear
from .deq import DEQ

__all__ = [
    "DEQ",
    "DEQLinear",
    "LinfContractiveConvDEQ",
    "LinfContractiveDEQ",
    "LipschitzConvDEQ",
    "LipschitzDEQ",
    "PositiveConcaveConvDEQ",
    "PositiveConcaveDEQ",
]
