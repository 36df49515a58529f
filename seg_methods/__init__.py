"""seg_methods: recent image-segmentation papers as Detectron2 meta-architectures.

Importing the package registers every component (datasets, mappers, backbones, meta-archs) in
detectron2's and seg_methods' registries.
"""
import warnings

# detectron2 scripts a few helpers at import time; torch >= 2.10 warns about torch.jit.script.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from . import config  # noqa: F401,E402
from . import data  # noqa: F401,E402  registers datasets and dataset mappers
from . import modeling  # noqa: F401,E402  registers backbones, heads, meta-architectures

# Weights files are never unpickled with plain pickle / torch.load(weights_only=False) once
# seg_methods is imported: detectron2's DetectionCheckpointer (DefaultPredictor, DefaultTrainer,
# model_zoo) and fvcore's Checkpointer read through seg_methods.utils.checkpoint's safe readers.
from .utils.checkpoint import install_safe_loaders  # noqa: E402

install_safe_loaders()

__version__ = "0.1.0"
