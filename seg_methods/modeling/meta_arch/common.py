"""Plumbing the meta-architecture templates share (input checks, head assembly)."""

from typing import Dict, List, Tuple

from detectron2.layers import ShapeSpec
from torch import nn

from ..build import build_pixel_decoder, build_transformer_decoder

__all__ = ["require_inputs", "build_decoder_pair"]


def require_inputs(batched_inputs: List[Dict], key: str, what: str, hint: str) -> None:
    """Raise a ValueError naming the missing input key and how to get it.

    Args:
        batched_inputs (list[dict]): the model's inputs.
        key (str): input key every dict must have (e.g. "instances").
        what (str): what needs it (e.g. "Training Mask2Former").
        hint (str): how to get it (e.g. "check cfg.INPUT.DATASET_MAPPER_NAME").
    """
    missing = [i for i, x in enumerate(batched_inputs) if key not in x]
    if missing:
        raise ValueError(
            f"{what} needs '{key}' in every input (missing in inputs {missing}); {hint}"
        )


def build_decoder_pair(
    cfg,
    pixel_decoder_name: str,
    transformer_decoder_name: str,
    input_shape: Dict[str, ShapeSpec],
) -> Tuple[nn.Module, nn.Module]:
    """A pixel decoder and the query decoder it feeds, from their registries.

    The query decoder's input channels and mask-embedding channels are facts of the pixel decoder
    (its ``conv_dim`` and ``mask_dim``, read from the pixel decoder's own config node), so they
    are passed on rather than restated in the query decoder's config.

    Args:
        cfg (CfgNode): the config.
        pixel_decoder_name (str): name in PIXEL_DECODER_REGISTRY.
        transformer_decoder_name (str): name in TRANSFORMER_DECODER_REGISTRY.
        input_shape (dict[str, ShapeSpec]): backbone output shapes.

    Returns:
        tuple[nn.Module, nn.Module]: (pixel decoder, transformer decoder).
    """
    pixel_decoder = build_pixel_decoder(cfg, pixel_decoder_name, input_shape)
    predictor = build_transformer_decoder(
        cfg,
        transformer_decoder_name,
        pixel_decoder.conv_dim,
        True,
        mask_dim=pixel_decoder.mask_dim,
    )
    return pixel_decoder, predictor
