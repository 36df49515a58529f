"""PISR: the universal relational context module of Borse et al., "Panoptic, Instance and Semantic
Relations: A Relational Context Encoder to Enhance Panoptic Segmentation", CVPR 2022.

The module takes three things a base panoptic model already computes and returns relational
features of the same shape as the base model's pixel features, which the base model's heads then
read instead of their own pixel features (Fig. 2, right):

* pixel features ``F`` (B, C, H, W) (the input of the base model's heads);
* semantic logits (B, K, H, W) of the base model (class level);
* instance features (B, N, C_i) with one score per instance (B, N) and, for the Table 5
  baselines only, soft instance maps (B, N, H, W).

Fig. 3a, initial panoptic encodings (D channels each):

* semantic encodings ``S_k = sum_p softmax_p(z_k)(p) phi(F)(p)``, one per class ``k``: the pixel
  features pooled with the class's spatial softmax over the image (OCR's soft object regions);
* instance encodings ``I_j = psi(f_j)`` of the top-K instances by score (:func:`select_top_k`);
  fewer than K candidates are padded and masked out of every attention.

Fig. 3b, reweighting and two-stage Panoptic Relational Attention (PRA):

* reweighting: ``I'_j = w_j I_j`` with ``w_j = sigmoid(g(I_j))``, ``g`` a two-layer MLP (learned
  importance of each instance); the semantic encodings are not reweighted;
* panoptic encodings ``P = [S; I']`` ((K + top-K), D);
* stage 1 (relations among classes and instances): ``P1 = P + PRA(P, P)``;
* stage 2 (pixel-to-panoptic relations): ``R = PRA(phi(F), P1)``;
* ``PRA(X, Y) = softmax(q(X) k(Y)^T / sqrt(D)) v(Y)`` followed by a linear output projection,
  the softmax running over the valid rows of ``Y`` (the attention weights of a query sum to 1);
* output: ``F + fuse([F, R])`` with ``fuse`` a 1x1 convolution initialised to zero by default
  (``MODEL.PISR.ZERO_INIT_FUSE``), so that a freshly switched-on module starts from the base
  model's features.

Table 5 variants (``variant``):

* ``"concat"``: ``R = proj([softmax_k(z), M])``, semantic probabilities and the top-K instance
  maps ``M`` concatenated with ``F`` (through the same ``fuse``);
* ``"product"``: ``R = phi(F) * proj([softmax_k(z), M])`` (S and I brought to F's dimension,
  then multiplied elementwise with F);
* ``"ocr"``: ``R = PRA(phi(F), S)`` (OCR on the semantic features only, no instances);
* ``"pisr_no_reweight"``: full PISR with ``w_j = 1``;
* ``"pisr"``: full PISR.

Shape shorthand:
    B: batch, C: pixel channels, C_i: instance-feature channels, K: classes, N: instance
    candidates, T: top-K, D: encoding channels, H, W: pixel-feature size.
"""

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "PISR_VARIANTS",
    "PanopticRelationalAttention",
    "PISRModule",
    "gather_rows",
    "select_top_k",
]

PISR_VARIANTS = ("pisr", "pisr_no_reweight", "concat", "product", "ocr")
_USES_INSTANCE_FEATURES = ("pisr", "pisr_no_reweight")
_USES_INSTANCE_MAPS = ("concat", "product")


def select_top_k(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Indices of the ``k`` highest scores of every image, padded when fewer exist.

    Branch-free (traceable with any N): ``k`` entries of ``-inf`` are appended before
    ``topk``; a selected entry is valid when its score is finite, so candidates a caller wants
    excluded can be given the score ``-inf``.

    Args:
        scores (Tensor): (B, N) candidate scores (N may be 0).
        k (int): T, number of instances kept.

    Returns:
        tuple: indices (B, T) int64 into the N candidates (0 where invalid) in descending score
        order, and valid (B, T) bool.
    """
    pad = scores.new_full((scores.shape[0], k), float("-inf"))
    top, idx = torch.cat([scores, pad], dim=1).topk(k, dim=1)
    valid = torch.isfinite(top)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, t]]`` for every b, t.

    Args:
        x (Tensor): (B, N, ...) with N >= 1.
        idx (Tensor): (B, T) int64 in [0, N).

    Returns:
        Tensor: (B, T, ...).
    """
    view = idx.reshape(idx.shape + (1,) * (x.dim() - 2))
    return torch.gather(x, 1, view.expand(idx.shape + x.shape[2:]))


class PanopticRelationalAttention(nn.Module):
    """PRA: queries attend to a set of encodings (single head, scaled dot product).

    Args:
        query_dim (int): channels of the queries.
        key_dim (int): channels of the attended encodings.
        dim (int): D, projection and output channels.
    """

    def __init__(self, query_dim: int, key_dim: int, dim: int):
        super().__init__()
        self.q = nn.Linear(query_dim, dim)
        self.k = nn.Linear(key_dim, dim)
        self.v = nn.Linear(key_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(
        self, query: Tensor, keys: Tensor, key_valid: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query (Tensor): (B, M, query_dim).
            keys (Tensor): (B, L, key_dim).
            key_valid (Tensor or None): (B, L) bool; invalid keys get zero weight. A query with
                no valid key gets zero weights everywhere (and a zero context).

        Returns:
            tuple: context (B, M, D) and attention weights (B, M, L) (rows sum to 1 over the
            valid keys).
        """
        logits = torch.einsum("bmd,bld->bml", self.q(query), self.k(keys)) * self.scale
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
        attn = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)
        return self.out(torch.einsum("bml,bld->bmd", attn, self.v(keys))), attn


class PISRModule(nn.Module):
    """Relational context of PISR (Fig. 3) or one of its Table 5 alternatives (module docstring).

    Args:
        pixel_channels (int): C.
        num_classes (int): K, channels of the semantic logits.
        instance_channels (int): C_i (unused by the variants without instance features).
        channels (int): D.
        top_k (int): T, instances kept.
        variant (str): one of :data:`PISR_VARIANTS`.
        zero_init_fuse (bool): initialise ``fuse`` to zero (the module starts as the identity on
            F); False keeps PyTorch's default initialisation.
    """

    def __init__(
        self,
        pixel_channels: int,
        num_classes: int,
        instance_channels: int,
        *,
        channels: int = 256,
        top_k: int = 10,
        variant: str = "pisr",
        zero_init_fuse: bool = True,
    ):
        super().__init__()
        if variant not in PISR_VARIANTS:
            raise ValueError(f"MODEL.PISR.VARIANT must be one of {PISR_VARIANTS}, got {variant!r}")
        if top_k < 1:
            raise ValueError(f"MODEL.PISR.TOP_K must be >= 1, got {top_k}")
        self.variant, self.top_k, self.num_classes = variant, top_k, num_classes
        self.pixel_proj = nn.Sequential(nn.Conv2d(pixel_channels, channels, 1), nn.ReLU())  # phi
        if variant in _USES_INSTANCE_FEATURES:
            self.instance_proj = nn.Sequential(nn.Linear(instance_channels, channels), nn.ReLU())
            if variant == "pisr":  # g: learned importance of each instance encoding
                self.importance = nn.Sequential(
                    nn.Linear(channels, channels // 4), nn.ReLU(), nn.Linear(channels // 4, 1)
                )
            self.stage1 = PanopticRelationalAttention(channels, channels, channels)
        if variant in _USES_INSTANCE_FEATURES + ("ocr",):
            self.stage2 = PanopticRelationalAttention(channels, channels, channels)
        if variant in _USES_INSTANCE_MAPS:
            self.context_proj = nn.Sequential(
                nn.Conv2d(num_classes + top_k, channels, 1), nn.ReLU()
            )
        self.fuse = nn.Conv2d(pixel_channels + channels, pixel_channels, 1)
        if zero_init_fuse:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)

    @property
    def needs_instance_maps(self) -> bool:
        return self.variant in _USES_INSTANCE_MAPS

    def semantic_encodings(self, pixel_emb: Tensor, sem_logits: Tensor) -> Tensor:
        """Class-level encodings S (Fig. 3a).

        Args:
            pixel_emb (Tensor): (B, D, H, W) projected pixel features phi(F).
            sem_logits (Tensor): (B, K, H, W).

        Returns:
            Tensor: (B, K, D); each class's weights over the H*W pixels sum to 1.
        """
        weights = sem_logits.flatten(2).softmax(dim=-1)  # (B, K, HW)
        return torch.einsum("bkp,bdp->bkd", weights, pixel_emb.flatten(2))

    def panoptic_encodings(
        self,
        pixel_emb: Tensor,
        sem_logits: Tensor,
        instance_features: Tensor,
        instance_scores: Tensor,
        reweight: Optional[bool] = None,
    ) -> Dict[str, Tensor]:
        """Initial panoptic encodings and their reweighting (Fig. 3a and first part of 3b).

        Args:
            pixel_emb (Tensor): (B, D, H, W) phi(F).
            sem_logits (Tensor): (B, K, H, W).
            instance_features (Tensor): (B, N, C_i).
            instance_scores (Tensor): (B, N); ``-inf`` excludes a candidate.
            reweight (bool or None): apply the learned importance (None: the variant's choice).

        Returns:
            dict: "encodings" P (B, K+T, D) = [S; w * I], "valid" (B, K+T) bool, "weights" w
            (B, T) (ones without reweighting), "indices" (B, T), "semantic" S (B, K, D),
            "instance" I (B, T, D) before reweighting.
        """
        if reweight is None:
            reweight = self.variant == "pisr"
        sem = self.semantic_encodings(pixel_emb, sem_logits)
        idx, valid = select_top_k(instance_scores, self.top_k)
        b = sem.shape[0]
        if instance_features.shape[1] == 0:  # no candidate at all: every slot is padding
            feats = instance_features.new_zeros((b, self.top_k, instance_features.shape[-1]))
        else:
            feats = gather_rows(instance_features, idx)
        inst = self.instance_proj(feats) * valid[..., None].to(feats.dtype)  # (B, T, D)
        if reweight:
            if not hasattr(self, "importance"):
                raise ValueError(f"variant {self.variant!r} has no learned importance")
            weights = torch.sigmoid(self.importance(inst)).squeeze(-1)  # (B, T)
        else:
            weights = torch.ones_like(inst[..., 0])
        enc = torch.cat([sem, inst * weights[..., None]], dim=1)
        valid_all = torch.cat([torch.ones_like(sem[..., 0], dtype=torch.bool), valid], dim=1)
        return {
            "encodings": enc,
            "valid": valid_all,
            "weights": weights,
            "indices": idx,
            "semantic": sem,
            "instance": inst,
        }

    def forward(
        self,
        pixel_features: Tensor,
        sem_logits: Tensor,
        instance_features: Optional[Tensor] = None,
        instance_scores: Optional[Tensor] = None,
        instance_maps: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """
        Args:
            pixel_features (Tensor): (B, C, H, W) F.
            sem_logits (Tensor): (B, K, H', W'), resized to (H, W) when different.
            instance_features (Tensor or None): (B, N, C_i) (PISR variants).
            instance_scores (Tensor or None): (B, N), ``-inf`` = not a candidate.
            instance_maps (Tensor or None): (B, N, H', W') soft maps in [0, 1] ("concat",
                "product"), resized to (H, W) when different.

        Returns:
            dict: "features" (B, C, H, W) = F + fuse([F, R]); "context" R (B, D, H, W); for the
            PISR variants also "attn_stage1" (B, K+T, K+T), "attn_stage2" (B, H*W, K+T),
            "weights" (B, T), "valid" (B, K+T); for "ocr" "attn_stage2" (B, H*W, K).
        """
        b, _, h, w = pixel_features.shape
        if sem_logits.shape[-2:] != (h, w):
            sem_logits = F.interpolate(
                sem_logits, size=(h, w), mode="bilinear", align_corners=False
            )
        emb = self.pixel_proj(pixel_features)  # (B, D, H, W)
        out: Dict[str, Tensor] = {}
        if self.variant in _USES_INSTANCE_FEATURES:
            if instance_features is None or instance_scores is None:
                raise ValueError(f"PISR variant {self.variant!r} needs instance features")
            enc = self.panoptic_encodings(emb, sem_logits, instance_features, instance_scores)
            p, valid = enc["encodings"], enc["valid"]
            rel, attn1 = self.stage1(p, p, valid)  # stage 1: among classes and instances
            p1 = p + rel
            ctx, attn2 = self.stage2(emb.flatten(2).transpose(1, 2), p1, valid)  # stage 2
            out.update(attn_stage1=attn1, attn_stage2=attn2, weights=enc["weights"], valid=valid)
        elif self.variant == "ocr":
            sem = self.semantic_encodings(emb, sem_logits)
            ctx, attn2 = self.stage2(emb.flatten(2).transpose(1, 2), sem)
            out["attn_stage2"] = attn2
        else:  # "concat" / "product": per-pixel semantic probabilities and top-K instance maps
            if instance_maps is None or instance_scores is None:
                raise ValueError(f"PISR variant {self.variant!r} needs instance maps")
            if instance_maps.shape[-2:] != (h, w):
                instance_maps = F.interpolate(
                    instance_maps, size=(h, w), mode="bilinear", align_corners=False
                )
            idx, valid = select_top_k(instance_scores, self.top_k)
            if instance_maps.shape[1] == 0:
                maps = instance_maps.new_zeros((b, self.top_k, h, w))
            else:
                maps = gather_rows(instance_maps, idx) * valid[..., None, None].to(emb.dtype)
            context = self.context_proj(torch.cat([sem_logits.softmax(dim=1), maps], dim=1))
            ctx = context if self.variant == "concat" else emb * context
            ctx = ctx.flatten(2).transpose(1, 2)
        ctx = ctx.transpose(1, 2).reshape(b, -1, h, w)  # (B, D, H, W)
        out["context"] = ctx
        out["features"] = pixel_features + self.fuse(torch.cat([pixel_features, ctx], dim=1))
        return out
