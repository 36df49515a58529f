"""A detectron2 ``DefaultPredictor`` whose weights are loaded by the project checkpointer."""

from detectron2.engine import DefaultPredictor

from .trainer import build_checkpointer


def build_predictor(cfg) -> DefaultPredictor:
    """``DefaultPredictor`` for ``cfg`` with ``cfg.MODEL.WEIGHTS`` loaded through
    :func:`~seg_methods.engine.trainer.build_checkpointer` (``SegCheckpointer`` when present:
    restricted unpickling of .pkl files, errors naming mismatched or missing keys).

    Args:
        cfg (CfgNode): the model config; not modified.

    Returns:
        DefaultPredictor: call it with an (H, W, 3) BGR uint8 image.
    """
    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # DefaultPredictor would load with DetectionCheckpointer
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    if weights:
        build_checkpointer(predictor.model, strict=True).load(weights)
    return predictor
