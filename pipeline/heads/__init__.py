"""Classification heads on cached CLIP features: scikit-learn estimators saved without pickle.

Importing the package imports every head module, each of which registers its head in
`registry.HEADS`.
"""

from pipeline.heads.io import load_head, save_head
from pipeline.heads.meta import MetaHead
from pipeline.heads.mlp import MLPHead
from pipeline.heads.multitask import MultiTaskHead
from pipeline.heads.registry import HEADS, head_class, make_head, valid_params
from pipeline.heads.svm import SVMHead
from pipeline.heads.tip_adapter import TipAdapterHead
from pipeline.heads.ufd_probe import UFDProbeHead

__all__ = [
    "HEADS",
    "MLPHead",
    "MetaHead",
    "MultiTaskHead",
    "SVMHead",
    "TipAdapterHead",
    "head_class",
    "UFDProbeHead",
    "load_head",
    "make_head",
    "save_head",
    "valid_params",
]
