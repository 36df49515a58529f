"""CRM: continuous refinement of coarse masks for ultra-high-resolution images.

Shen et al., "High Quality Segmentation for Ultra High-resolution Images" (CVPR 2022); official
code dvlab-research/Entity ``High-Quality-Segmention`` (read for understanding, re-written). The
network (encoder on [image, coarse mask], implicit decoder, multi-resolution cascade) is in
:mod:`seg_methods.modeling.refinement.crm`; the losses in :mod:`seg_methods.modeling.criterion.crm`.
See projects/CRM/README.md.

Inputs (one dict per image, detectron2 style):

* ``"image"``: (3, H, W) in ``INPUT.FORMAT``, 0..255;
* ``"coarse_mask"``: (H, W) float in [0, 1], the mask to refine (the ``coarse_mask`` target
  generator's output); fed to the network as ``(m - 0.5) * 2``;
* training: ``"gt_mask"`` (H, W) bool;
* optional ``"height"``, ``"width"``: the output size (default (H, W)); CRM queries its decoder
  directly at that size.

Outputs at inference, per image:

* with a ``"coarse_mask"``: ``{"refined_mask": (height, width) probability, "sem_seg": (2,
  height, width) [1 - p, p]}``;
* without one, when ``MODEL.CRM.BASE_CONFIG`` names a base model: ``{"sem_seg": (C, height,
  width)}``, the base model's semantic prediction refined class by class (see
  :meth:`CRM.refine_semantic`).

Shape shorthand:
    B: batch, H, W: (padded) input size, C: classes of the base model
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_model
from torch import nn

from ...config import get_cfg
from ...utils.checkpoint import SegCheckpointer
from ..criterion.crm import crm_losses
from ..refinement.crm import CRMFusion, CRMNet, ImplicitDecoder, cascade_refine, make_coord
from .common import require_inputs

__all__ = ["CRM", "SEMANTIC_INPUTS", "build_base_model"]

logger = logging.getLogger(__name__)

SEMANTIC_INPUTS = ("argmax", "probability")
_REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)


def _resolve_config_path(path: str) -> str:
    """``path`` as given when it exists, else relative to the repository root."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(_REPO_ROOT, path)
    return candidate if os.path.isfile(candidate) else path


def build_base_model(config_file: str, weights: str, device: str) -> Tuple[nn.Module, str]:
    """Build a frozen seg_methods model from its config file (``MODEL.CRM.BASE_CONFIG``).

    Args:
        config_file (str): the model's config (absolute, or relative to the working directory or
            the repository root).
        weights (str): its weights (``MODEL.CRM.BASE_WEIGHTS``); empty: left as built (random,
            unless MODEL.WEIGHTS of the CRM model holds ``base_model.*`` entries).
        device (str): device to build it on (the CRM model's ``MODEL.DEVICE``).

    Returns:
        tuple: (model in eval mode with requires_grad False, its INPUT.FORMAT).
    """
    path = _resolve_config_path(config_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.CRM.BASE_CONFIG '{config_file}' not found (tried it as given and relative to "
            f"{_REPO_ROOT})"
        )
    base_cfg = get_cfg()
    base_cfg.merge_from_file(path)
    if base_cfg.MODEL.META_ARCHITECTURE == "CRM":
        raise ValueError(
            f"MODEL.CRM.BASE_CONFIG '{config_file}' is itself a CRM config; name the config of the "
            "segmentation model whose output CRM should refine"
        )
    base_cfg.MODEL.DEVICE = device
    base_cfg.MODEL.WEIGHTS = weights
    base_cfg.freeze()
    model = build_model(base_cfg)
    if weights:
        SegCheckpointer(model, strict=True).load(weights)
    else:
        logger.warning(
            f"MODEL.CRM.BASE_CONFIG '{config_file}' is used without MODEL.CRM.BASE_WEIGHTS: the "
            "base model's weights come from MODEL.WEIGHTS' base_model.* entries, or stay random"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, base_cfg.INPUT.FORMAT


@META_ARCH_REGISTRY.register()
class CRM(CRMNet):
    """Continuous Refinement Model (see the module docstring).

    Args:
        backbone (nn.Module): detectron2 Backbone taking the 4-channel input.
        in_features (list[str]): backbone outputs fused, finest first.
        fusion (CRMFusion): multi-level fusion to the latent map.
        decoder (ImplicitDecoder): the implicit decoder.
        pixel_mean, pixel_std (list[float]): image normalisation (INPUT.FORMAT order).
        input_format (str): INPUT.FORMAT of the images.
        test_scales (list[float]): cascade scales.
        query_chunk (int): queries per decoder call at inference.
        fusion_tile_rows (int): latent-map rows fused per strip at inference (0: whole map).
        test_pad (int): reflect padding at inference.
        suppress_empty (bool): official suppression of empty coarse masks.
        l1_weight, l2_weight, grad_weight, ce_weight, sobel_eps: loss settings
            (:func:`~seg_methods.modeling.criterion.crm.crm_losses`).
        base_model (nn.Module or None): frozen seg_methods model whose "sem_seg" is refined when
            an input has no "coarse_mask".
        base_input_format (str): the base model's INPUT.FORMAT.
        base_weights_pinned (bool): the base weights came from MODEL.CRM.BASE_WEIGHTS; the base
            model is then not part of CRM's state dict (checkpoints hold CRM's weights only).
            Otherwise it is a submodule, saved and loaded with CRM as ``base_model.*``.
        semantic_input (str): "argmax" or "probability" (see :meth:`refine_semantic`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: Sequence[str],
        fusion: CRMFusion,
        decoder: ImplicitDecoder,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        test_scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
        query_chunk: int = 65536,
        fusion_tile_rows: int = 512,
        test_pad: int = 32,
        suppress_empty: bool = True,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        grad_weight: float = 5.0,
        ce_weight: float = 0.0,
        sobel_eps: float = 1e-4,
        base_model: Optional[nn.Module] = None,
        base_input_format: str = "RGB",
        base_weights_pinned: bool = False,
        semantic_input: str = "argmax",
    ):
        super().__init__(backbone, in_features, fusion, decoder, fusion_tile_rows)
        if semantic_input not in SEMANTIC_INPUTS:
            raise ValueError(
                f"MODEL.CRM.SEMANTIC_INPUT must be one of {SEMANTIC_INPUTS}, got {semantic_input!r}"
            )
        if not test_scales or any(s <= 0 for s in test_scales):
            raise ValueError(f"MODEL.CRM.TEST_SCALES must be positive, got {list(test_scales)}")
        if base_model is not None and base_input_format != input_format:
            if {base_input_format, input_format} != {"RGB", "BGR"}:
                raise ValueError(
                    f"INPUT.FORMAT {input_format!r} of CRM and {base_input_format!r} of "
                    "MODEL.CRM.BASE_CONFIG differ and are not an RGB/BGR pair"
                )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.input_format = input_format
        self.test_scales = [float(s) for s in test_scales]
        self.query_chunk = int(query_chunk)
        self.test_pad = int(test_pad)
        self.suppress_empty = suppress_empty
        self.loss_kwargs = dict(
            l1_weight=l1_weight,
            l2_weight=l2_weight,
            grad_weight=grad_weight,
            ce_weight=ce_weight,
            sobel_eps=sobel_eps,
        )
        self.base_input_format = base_input_format
        self.base_weights_pinned = bool(base_weights_pinned and base_model is not None)
        self.semantic_input = semantic_input
        if self.base_weights_pinned:
            # Weights from MODEL.CRM.BASE_WEIGHTS: kept out of the module tree, hence out of
            # CRM's state dict and checkpoints (MODEL.WEIGHTS holds CRM's own weights only).
            object.__setattr__(self, "base_model", base_model)
        else:
            # No BASE_WEIGHTS: a submodule, saved and loaded with CRM's checkpoints.
            self.base_model = base_model

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CRM
        if cfg.MODEL.BACKBONE.NAME == "build_timm_backbone" and cfg.MODEL.TIMM.IN_CHANS != 4:
            raise ValueError(
                f"CRM's encoder takes [image, coarse mask] (4 channels): set MODEL.TIMM.IN_CHANS "
                f"to 4 (got {cfg.MODEL.TIMM.IN_CHANS})"
            )
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=4))
        shapes = backbone.output_shape()
        missing = [k for k in c.IN_FEATURES if k not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.CRM.IN_FEATURES {list(c.IN_FEATURES)}: {missing} not among the backbone "
                f"outputs {sorted(shapes)}"
            )
        fusion = CRMFusion(
            [shapes[k].channels for k in c.IN_FEATURES],
            list(c.BRANCH_CHANNELS),
            c.FUSION_CHANNELS,
            norm=c.NORM,
            dropout=c.DROPOUT,
        )
        decoder = ImplicitDecoder(
            c.FUSION_CHANNELS,
            list(c.MLP_HIDDEN_DIMS),
            abs_coord=c.ABS_COORD,
            cell_decode=c.CELL_DECODE,
            local_ensemble=c.LOCAL_ENSEMBLE,
        )
        base_model, base_format = None, cfg.INPUT.FORMAT
        if c.BASE_CONFIG:
            base_model, base_format = build_base_model(
                c.BASE_CONFIG, c.BASE_WEIGHTS, cfg.MODEL.DEVICE
            )
        elif c.BASE_WEIGHTS:
            raise ValueError("MODEL.CRM.BASE_WEIGHTS is set but MODEL.CRM.BASE_CONFIG is empty")
        return {
            "backbone": backbone,
            "in_features": list(c.IN_FEATURES),
            "fusion": fusion,
            "decoder": decoder,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "test_scales": list(c.TEST_SCALES),
            "query_chunk": c.QUERY_CHUNK,
            "fusion_tile_rows": c.FUSION_TILE_ROWS,
            "test_pad": c.TEST_PAD,
            "suppress_empty": c.SUPPRESS_EMPTY,
            "l1_weight": c.L1_WEIGHT,
            "l2_weight": c.L2_WEIGHT,
            "grad_weight": c.GRAD_WEIGHT,
            "ce_weight": c.CE_WEIGHT,
            "sobel_eps": c.SOBEL_EPS,
            "base_model": base_model,
            "base_input_format": base_format,
            "base_weights_pinned": bool(c.BASE_WEIGHTS),
            "semantic_input": c.SEMANTIC_INPUT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() etc. also reach a base model kept out of the module tree
        super()._apply(fn, *args, **kwargs)
        if self.base_weights_pinned:
            self.base_model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        """Set the mode of the CRM parts; the base model always stays in eval mode."""
        super().train(mode)
        if self.base_model is not None:
            self.base_model.eval()
        return self

    # ------------------------------------------------------------------ helpers
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) 0..255 image -> (3, H, W) float, normalised with PIXEL_MEAN / STD."""
        return (image.to(self.device).float() - self.pixel_mean) / self.pixel_std

    @staticmethod
    def _check_mask(x: Dict, key: str, index: int) -> torch.Tensor:
        """The (H, W) mask ``x[key]``, checked against the size of ``x["image"]``."""
        mask = x[key]
        image_size = tuple(x["image"].shape[-2:])
        if mask.dim() != 2 or tuple(mask.shape) != image_size:
            where = f" of '{x['file_name']}'" if "file_name" in x else ""
            raise ValueError(
                f"input {index}{where}: '{key}' has size {tuple(mask.shape)} but its image is "
                f"{image_size} (H, W); '{key}' must be an (H, W) map of the image's size"
            )
        return mask

    # ------------------------------------------------------------------ public API
    def refine(
        self,
        image: torch.Tensor,
        coarse_mask: torch.Tensor,
        output_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Refine one coarse mask with the multi-resolution cascade (``MODEL.CRM.TEST_SCALES``).

        Run it on a model in eval mode (and under ``torch.no_grad()`` for inference).

        Args:
            image (Tensor): (3, H, W) in INPUT.FORMAT, 0..255 (a model input's "image").
            coarse_mask (Tensor): (H, W) in [0, 1].
            output_size (tuple[int, int] or None): (oh, ow); None: (H, W).

        Returns:
            Tensor: (oh, ow) refined foreground probability.
        """
        if tuple(coarse_mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"'coarse_mask' has size {tuple(coarse_mask.shape)} but the image is "
                f"{tuple(image.shape[-2:])} (H, W)"
            )
        seg = (coarse_mask.to(self.device).float() - 0.5) * 2
        return cascade_refine(
            self,
            self.normalize(image)[None],
            seg[None, None],
            scales=self.test_scales,
            output_size=output_size,
            chunk=self.query_chunk,
            pad=self.test_pad,
            suppress_empty=self.suppress_empty,
        )

    def refine_semantic(
        self, image: torch.Tensor, output_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """Refine the base model's semantic prediction class by class.

        CascadePSP's scene-parsing protocol (``eval_post_ade.py``): every class of the base
        prediction is refined as a binary mask, and a pixel takes the refined class of highest
        confidence when it exceeds 0.5, else keeps the base label. Here the scores are
        ``max(p_c, 0.5 [base label == c])`` so that their argmax is that label. Differences: the
        whole image is refined per class (CascadePSP refines crops around connected components)
        and no class is down-weighted (CascadePSP scales ADE20K's background classes by 0.51).

        Args:
            image (Tensor): (3, H, W) in INPUT.FORMAT, 0..255.
            output_size (tuple[int, int] or None): (oh, ow); None: (H, W).

        Returns:
            Tensor: (C, oh, ow) scores.
        """
        if self.base_model is None:
            raise ValueError("refine_semantic needs a base model: set MODEL.CRM.BASE_CONFIG")
        H, W = image.shape[-2:]
        out_size = (H, W) if output_size is None else output_size
        base_image = image if self.base_input_format == self.input_format else image.flip(0)
        probs = self.base_model([{"image": base_image, "height": H, "width": W}])[0]["sem_seg"]
        probs = probs.to(self.device).float()
        labels = probs.argmax(dim=0)
        if tuple(out_size) == (H, W):
            out_labels = labels
        else:
            out_labels = nn.functional.interpolate(
                probs[None], size=tuple(out_size), mode="bilinear", align_corners=False
            )[0].argmax(dim=0)
        tracing = torch.jit.is_tracing()
        scores = []
        for c in range(probs.shape[0]):
            if self.semantic_input == "argmax":
                coarse = (labels == c).float()
            else:
                coarse = probs[c].clamp(0.0, 1.0)
            if self.suppress_empty and not tracing and not bool((coarse > 0).any()):
                # the cascade would output exactly 0 (empty-mask suppression at every scale)
                refined = coarse.new_zeros(tuple(out_size))
            else:
                refined = self.refine(image, coarse, out_size)
            scores.append(torch.maximum(refined, 0.5 * (out_labels == c).float()))
        return torch.stack(scores)

    # ------------------------------------------------------------------ forward
    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Training: query every pixel of the (padded) batch; official losses per image."""
        hint = (
            "add the 'coarse_mask' target generator (INPUT.EXTRA_TARGETS: ['coarse_mask']) or "
            "use a dataset/mapper that gives 'coarse_mask' and 'gt_mask'"
        )
        require_inputs(batched_inputs, "coarse_mask", "Training CRM", hint)
        require_inputs(batched_inputs, "gt_mask", "Training CRM", hint)
        sizes = []
        for i, x in enumerate(batched_inputs):
            self._check_mask(x, "coarse_mask", i)
            self._check_mask(x, "gt_mask", i)
            sizes.append((int(x["image"].shape[-2]), int(x["image"].shape[-1])))
        B = len(batched_inputs)
        H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
        images = torch.zeros((B, 3, H, W), device=self.device)
        seg = torch.full((B, 1, H, W), -1.0, device=self.device)  # padding = background
        gt = torch.zeros((B, H, W), device=self.device)
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, sizes)):
            images[i, :, :h, :w] = self.normalize(x["image"])
            seg[i, 0, :h, :w] = (x["coarse_mask"].to(self.device).float() - 0.5) * 2
            gt[i, :h, :w] = x["gt_mask"].to(self.device).float()
        latent = self.encode(images, seg)
        coord = make_coord((H, W), device=self.device, flatten=True)
        cell = coord.new_tensor([2.0 / H, 2.0 / W]).expand_as(coord)
        logits = self.query(latent, coord.expand(B, -1, -1), cell.expand(B, -1, -1))
        return crm_losses(logits.view(B, H, W), gt, sizes, **self.loss_kwargs)

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Per image: refine its "coarse_mask", or the base model's prediction."""
        results = []
        for i, x in enumerate(batched_inputs):
            if "image" not in x:
                raise ValueError(f"CRM input {i} has no 'image'")
            H, W = x["image"].shape[-2:]
            out_size = (x.get("height", H), x.get("width", W))
            if "coarse_mask" in x:
                mask = self._check_mask(x, "coarse_mask", i)
                prob = self.refine(x["image"], mask, out_size)
                results.append({"refined_mask": prob, "sem_seg": torch.stack([1 - prob, prob])})
            elif self.base_model is not None:
                results.append({"sem_seg": self.refine_semantic(x["image"], out_size)})
            else:
                where = f" ('{x['file_name']}')" if "file_name" in x else ""
                raise ValueError(
                    f"CRM input {i}{where} has no 'coarse_mask' and no base model is configured: "
                    "give each input a 'coarse_mask' (H, W) in [0, 1], or set "
                    "MODEL.CRM.BASE_CONFIG (and MODEL.CRM.BASE_WEIGHTS) to refine that model's "
                    "prediction"
                )
        return results

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts (see the module docstring).

        Returns:
            training: {"loss_l1", "loss_l2", "loss_grad"(, "loss_ce")}; inference: one dict per
            image.
        """
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)
