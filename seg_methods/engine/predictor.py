"""A detectron2 ``DefaultPredictor`` whose weights are loaded by the project checkpointer."""

from detectron2.engine import DefaultPredictor

from ..utils.checkpoint import require_weights
from .trainer import build_checkpointer


def build_predictor(cfg, *, allow_random_weights: bool = False) -> DefaultPredictor:
    """``DefaultPredictor`` for ``cfg`` with ``cfg.MODEL.WEIGHTS`` loaded through
    :func:`~seg_methods.engine.trainer.build_checkpointer` (``SegCheckpointer``: restricted
    unpickling of .pkl files, weights-only torch files, NaN/Inf weights refused, errors naming
    mismatched or missing keys).

    Args:
        cfg (CfgNode): the model config; not modified.
        allow_random_weights (bool): build the predictor with random weights when
            ``cfg.MODEL.WEIGHTS`` is empty (``demo.py --random-weights``); refused otherwise.

    Returns:
        DefaultPredictor: call it with an (H, W, 3) BGR uint8 image.

    Raises:
        RandomWeightsError: ``cfg.MODEL.WEIGHTS`` is empty and ``allow_random_weights`` is False.
        FileNotFoundError: ``cfg.MODEL.WEIGHTS`` does not exist.
    """
    weights = cfg.MODEL.WEIGHTS
    require_weights(
        weights,
        allow_random_weights,
        how_to_allow="pass --random-weights to demo.py (allow_random_weights=True in Python)",
    )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # load below with SegCheckpointer (strict), not DefaultPredictor's
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    if weights:
        build_checkpointer(predictor.model, strict=True).load(weights)
    return predictor
