"""Layers and custom ops (compiled in seg_methods._C, with pure-PyTorch references)."""
from .axial import AxialAttention, AxialAttention2D, AxialBlock  # noqa: F401
from .clustering import (  # noqa: F401
    hard_cluster,
    hard_cluster_from_qk,
    hard_cluster_pytorch,
    soft_cluster,
    soft_cluster_pytorch,
)
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch  # noqa: F401
