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
from .dense_affinity import (  # noqa: F401
    DenseAffinityApply,
    dense_affinity_apply,
    dense_affinity_apply_batched,
    dense_affinity_apply_pytorch,
)
from .token_association import (  # noqa: F401
    TokenAssociation,
    token_association,
    token_association_pytorch,
)
from .hle_decode import (  # noqa: F401
    hle_assign_pixels_to_seeds,
    hle_greedy_seed_clustering,
    hle_seed_kernel_row,
)
