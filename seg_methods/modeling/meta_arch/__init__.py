"""Meta-architectures (registered in detectron2's META_ARCH_REGISTRY)."""
from .cmt_deeplab import CMTDeepLab  # noqa: F401
from .mask2former import Mask2Former  # noqa: F401
from .mask_classification import MaskClassificationModel  # noqa: F401
from .clustseg import ClustSeg  # noqa: F401
from .per_pixel import PerPixelSemanticModel  # noqa: F401
from .protoseg import ProtoSeg  # noqa: F401
from .hssn import HSSN  # noqa: F401  (also HSSNMask2Former, built by HSSN for BASE "mask2former")
from .crm import CRM  # noqa: F401
from .regproxy import RegProxy  # noqa: F401
from .hle import HierarchicalLovaszEmbedding  # noqa: F401
from .pisr import PISR  # noqa: F401  (PISR on Panoptic-FPN / Panoptic-DeepLab / Mask2Former)
from .dense_affinity_panoptic import DenseAffinityPanoptic  # noqa: F401
from .panoptic_segformer import PanopticSegFormer  # noqa: F401
