"""ClustSeg building blocks: recurrent cross-attention (Eq. 10-11) and dreamy-start (Eq. 7-9).

ClustSeg (Liang et al., ICML 2023) treats the queries as cluster centres:

* :class:`RecurrentCrossAttention` runs T EM iterations inside one decoder layer (Eq. 10): the
  E-step is a softmax over the *cluster* axis of the query-key affinities, the M-step aggregates
  the values with that assignment; the query projection is re-applied to the new centres at every
  iteration (Algorithm 2) while the keys and values are computed once. The same module also runs
  the two baselines of Table 4c: "vanilla" cross-attention (Eq. 5, softmax over the pixels) and
  "kmeans" cross-attention (kMaX-DeepLab's hard argmax assignment).
* :class:`DreamyStart` creates the initial centres: scene-agnostic class centres from per-class
  FIFO memory banks through an FFN (Eq. 7), scene-adaptive seeds sampled from the
  position-embedded feature map through an FFN (Eq. 8), grid-sampled superpixel seeds (Eq. 9), or
  free parameters (the ablation of Table 4b).

Shape shorthand:
    B: batch, K: clusters (queries), D: hidden dim, h: heads, d = D / h, HW: pixels of a level,
    S: classes with a memory bank, M: entries per bank, H, W: size of a feature map
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.clustering import hard_cluster, soft_cluster
from ...layers.transformer_layers import MLP
from ..superpixel_counts import check_num_superpixels

CROSS_ATTENTION_MODES = ("recurrent", "kmeans", "vanilla")
M_STEPS = ("mean", "sum")
THING_INITS = ("scene_adaptive", "free")
STUFF_INITS = ("scene_agnostic", "scene_adaptive", "free")
SEED_SAMPLERS = ("grid", "topk")


# --------------------------------------------------------------------------------------------
# recurrent cross-attention (Eq. 10-11)
# --------------------------------------------------------------------------------------------
class RecurrentCrossAttention(nn.Module):
    """One recurrent cross-attention layer: T E/M iterations with shared projections.

    With ``c^(0)`` the layer input (plus ``query_pos``) and, per head,
    ``K = W_k (I + pos)``, ``V = W_v I`` computed once::

        Q^(t)   = W_q (c^(t-1) + query_pos)
        M^(t)   = softmax_K(scale * Q^(t) K^T)                    E-step  (Eq. 10), (K, HW)
        c^(t)   = W_o (M^(t) V / M^(t) 1)   ("mean")   or   W_o (M^(t) V)   ("sum")   M-step
        output  = LayerNorm(c^(0) + c^(T))                        residual of Eq. 11

    The "mean" M-step (our default) is the weighted mean of classical EM / soft k-means; "sum" is
    Eq. 10 as printed. With identity projections, one head, scale 1 and "mean", the centres are
    exactly T steps of soft k-means with dot-product affinities (tested).

    ``mode="kmeans"`` replaces the E-step by a hard argmax over K (no gradient through it;
    :func:`seg_methods.layers.hard_cluster`); ``mode="vanilla"`` is Eq. 5 (softmax over the
    pixels, a standard cross-attention) iterated the same way.

    Parameter names: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``norm``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        num_iterations: int = 3,
        mode: str = "recurrent",
        m_step: str = "mean",
        scaled: bool = True,
        dropout: float = 0.0,
        normalize_before: bool = False,
        impl: str = "auto",
    ):
        """
        Args:
            d_model (int): D.
            nhead (int): h, must divide D.
            num_iterations (int): T >= 1.
            mode (str): "recurrent", "kmeans" or "vanilla".
            m_step (str): "mean" or "sum" (see the class docstring; "vanilla" ignores it).
            scaled (bool): multiply the affinities by d^-0.5.
            dropout (float): dropout on the update before the residual.
            normalize_before (bool): pre-LayerNorm variant.
            impl (str): implementation of the clustering ops ("auto", "ext", "pytorch").
        """
        super().__init__()
        if mode not in CROSS_ATTENTION_MODES:
            raise ValueError(f"mode must be one of {CROSS_ATTENTION_MODES}, got {mode!r}")
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations (T) must be >= 1, got {num_iterations}")
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        self.d_model, self.nhead = d_model, nhead
        self.num_iterations = num_iterations
        self.mode, self.m_step = mode, m_step
        self.scale = (d_model // nhead) ** -0.5 if scaled else 1.0
        self.impl = impl
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(lin.bias)

    def _split(self, x: Tensor) -> Tensor:
        # (B, L, D) -> (B*h, L, d)
        b, n, _ = x.shape
        return x.view(b, n, self.nhead, -1).transpose(1, 2).reshape(b * self.nhead, n, -1)

    def _merge(self, x: Tensor, b: int) -> Tensor:
        # (B*h, L, d) -> (B, L, D)
        n = x.shape[1]
        return x.view(b, self.nhead, n, -1).transpose(1, 2).reshape(b, n, self.d_model)

    def _one_step(self, q: Tensor, k: Tensor, v: Tensor, need_logits: bool):
        """One E-step + M-step on per-head tensors; returns ((B*h, K, d) update, logits|None)."""
        logits = None
        if self.mode == "recurrent":
            if self.m_step == "mean":
                # the cluster mass sum_n M[k, n] comes out of the same fused op as M V
                v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
            out = soft_cluster(q, k, v, return_logits=need_logits, scale=self.scale, impl=self.impl)
            update, logits = out if need_logits else (out, None)
            if self.m_step == "mean":
                update = update[..., :-1] / update[..., -1:].clamp(min=1e-6)
            return update, logits
        logits = torch.bmm(q, k.transpose(1, 2)) * self.scale  # (B*h, K, HW)
        if self.mode == "kmeans":
            update, _, _ = hard_cluster(logits, v, reduce=self.m_step, impl=self.impl)
            return update, logits
        attn = logits.softmax(dim=-1)  # Eq. 5: softmax over the pixels
        return torch.bmm(attn, v), logits

    def cluster(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        need_logits: bool = True,
    ) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
        """The T iterations without the residual / norm.

        Args:
            tgt (Tensor): (B, K, D) centres c^(0) (already normalised in the pre-norm variant).
            memory (Tensor): (B, HW, D) pixel features I.
            pos (Tensor or None): (B, HW, D) positional embedding added to the keys.
            query_pos (Tensor or None): (B, K, D) positional embedding added before W_q.
            need_logits (bool): also return the E-step logits.

        Returns:
            tuple: ``centres`` list of T tensors c^(1..T) (B, K, D) and ``logits`` list of T
            head-averaged affinities (B, K, HW) (None entries when not needed).
        """
        b = tgt.shape[0]
        k = self._split(self.k_proj(memory if pos is None else memory + pos))  # (B*h, HW, d)
        v = self._split(self.v_proj(memory))  # (B*h, HW, d)
        centres, all_logits = [], []
        c = tgt
        for _ in range(self.num_iterations):
            q = self._split(self.q_proj(c if query_pos is None else c + query_pos))  # (B*h, K, d)
            update, logits = self._one_step(q, k, v, need_logits)
            c = self.out_proj(self._merge(update, b))  # (B, K, D)
            centres.append(c)
            if logits is not None:
                logits = logits.view(b, self.nhead, *logits.shape[1:]).mean(1)  # (B, K, HW)
            all_logits.append(logits)
        return centres, all_logits

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        need_logits: bool = True,
    ) -> Tuple[Tensor, List[Tensor], List[Optional[Tensor]]]:
        """
        Args:
            tgt (Tensor): (B, K, D) layer input.
            memory, pos, query_pos, need_logits: see :meth:`cluster`.

        Returns:
            tuple: the layer output (B, K, D); ``states`` list of T tensors (B, K, D), the
            residual state whose projection gave the t-th E-step (state 1 is the input); and the
            T head-averaged E-step logits (B, K, HW) (None for "vanilla" or when not needed).
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        centres, logits = self.cluster(x, memory, pos, query_pos, need_logits)
        states = [tgt]
        for c in centres[:-1]:
            s = tgt + self.dropout(c)
            states.append(s if self.normalize_before else self.norm(s))
        out = tgt + self.dropout(centres[-1])
        out = out if self.normalize_before else self.norm(out)
        if self.mode == "vanilla":
            logits = [None] * len(logits)  # no E-step (softmax over pixels, not clusters)
        return out, states, logits


# --------------------------------------------------------------------------------------------
# dreamy-start (Eq. 7-9)
# --------------------------------------------------------------------------------------------
def grid_seed_coords(num: int, height: int, width: int, device=None) -> Tensor:
    """``num`` evenly spread sampling points over an (height, width) map.

    A grid of ``nh x nw >= num`` cells is laid over the map with ``nh / nw`` close to
    ``height / width``; the points are the centres of ``num`` cells taken at evenly spaced
    positions of the row-major cell order (all of them when ``nh * nw == num``). This realises
    Algorithm 1's grid sampler (``f = sqrt(num / (H W))`` cells per pixel along each axis) with
    exactly ``num`` points.

    Args:
        num (int): number of points, >= 1.
        height (int): H of the map.
        width (int): W of the map.

    Returns:
        Tensor: (num, 2) float32 (x, y) in [-1, 1], for ``F.grid_sample(align_corners=False)``.
    """
    if num < 1:
        raise ValueError(f"number of seeds must be >= 1, got {num}")
    nh = max(1, int(round(math.sqrt(num * height / width))))
    nw = int(math.ceil(num / nh))
    ys = (torch.arange(nh, dtype=torch.float32, device=device) + 0.5) / nh  # (nh,) in (0, 1)
    xs = (torch.arange(nw, dtype=torch.float32, device=device) + 0.5) / nw
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    cells = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)  # (nh*nw, 2) (x, y)
    pick = torch.linspace(0, nh * nw - 1, num, device=device).round().long()
    return cells[pick] * 2 - 1


def sample_at(feat: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``feat`` (B, C, H, W) at ``coords`` (P, 2) in [-1, 1] -> (B, P, C)."""
    grid = coords.to(feat.dtype)[None, None].expand(feat.shape[0], 1, -1, -1)  # (B, 1, P, 2)
    out = F.grid_sample(feat, grid, mode="bilinear", align_corners=False)  # (B, C, 1, P)
    return out[:, :, 0].transpose(1, 2)


class DreamyStart(nn.Module):
    """Initial cluster centres of ClustSeg (dreamy-start, Eq. 7-9) or free parameters.

    Queries are ordered [thing queries, stuff/semantic queries] (or only superpixel queries).

    * scene-agnostic (Eq. 7): one query per semantic class ``k`` of ``semantic_classes``,
      ``FFN(mean(B_k))`` where ``B_k`` is a FIFO queue of ``memory_size`` pixel embeddings of
      class ``k`` filled during training (:meth:`update_memory`). The queues are buffers, so
      they are saved in checkpoints and used unchanged at test time. A class whose queue is still
      empty (at the start of training, or a class never seen) uses a learned vector
      ``memory_fallback[k]`` in place of the mean.
    * scene-adaptive (Eq. 8): ``FFN(PE(I))`` at K seeds drawn from the position-embedded map by
      ``seed_sampler`` ("grid": evenly spread cells; "topk": the K pixels with the highest learned
      score ``seed_score``, the seed being multiplied by the sigmoid of its score).
    * superpixel (Eq. 9): ``FFN(Grid_Sample_K(PE(I)))`` with K chosen per call.
    * free: learned ``nn.Embedding`` vectors (Mask2Former-style queries).

    Queries that have no spatial seed (free, memory bank) get a learned positional embedding
    ``query_embed``; seeded queries use the positional encoding sampled at their seed.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_thing_queries: int,
        semantic_classes: Sequence[int],
        num_classes: int,
        thing_init: str = "scene_adaptive",
        stuff_init: str = "scene_agnostic",
        seed_sampler: str = "grid",
        memory_size: int = 256,
        memory_samples_per_image: int = 32,
        superpixel: bool = False,
    ):
        """
        Args:
            hidden_dim (int): D.
            num_thing_queries (int): instance/thing queries (0 for semantic / superpixel).
            semantic_classes (sequence[int]): contiguous class ids that get one semantic/stuff
                query each, in this order (stuff classes for panoptic, all classes for semantic).
            num_classes (int): number of classes of the dataset (to map labels to banks).
            thing_init (str): "scene_adaptive" or "free".
            stuff_init (str): "scene_agnostic", "scene_adaptive" or "free".
            seed_sampler (str): "grid" or "topk" (scene-adaptive seeds).
            memory_size (int): M, entries of each FIFO queue.
            memory_samples_per_image (int): pixels of one class pushed per image.
            superpixel (bool): build superpixel queries (Eq. 9) instead of thing/stuff ones.
        """
        super().__init__()
        if thing_init not in THING_INITS:
            raise ValueError(f"thing_init must be one of {THING_INITS}, got {thing_init!r}")
        if stuff_init not in STUFF_INITS:
            raise ValueError(f"stuff_init must be one of {STUFF_INITS}, got {stuff_init!r}")
        if seed_sampler not in SEED_SAMPLERS:
            raise ValueError(f"seed_sampler must be one of {SEED_SAMPLERS}, got {seed_sampler!r}")
        if memory_size < 1 or memory_samples_per_image < 1:
            raise ValueError("memory_size and memory_samples_per_image must be >= 1")
        self.hidden_dim = hidden_dim
        self.superpixel = superpixel
        self.num_thing = 0 if superpixel else num_thing_queries
        self.semantic_classes = [] if superpixel else [int(c) for c in semantic_classes]
        self.num_stuff = len(self.semantic_classes)
        self.thing_init, self.stuff_init = thing_init, stuff_init
        self.seed_sampler = seed_sampler
        self.memory_size = memory_size
        self.memory_samples_per_image = memory_samples_per_image
        d = hidden_dim
        if self.num_thing:
            if thing_init == "free":
                self.thing_query_feat = nn.Embedding(self.num_thing, d)
            else:
                self.thing_ffn = MLP(d, d, d, 2)
        if self.num_stuff:
            if stuff_init == "free":
                self.stuff_query_feat = nn.Embedding(self.num_stuff, d)
            else:
                self.stuff_ffn = MLP(d, d, d, 2)
            if stuff_init == "scene_agnostic":
                self.memory_fallback = nn.Parameter(torch.randn(self.num_stuff, d) * 0.02)
                self.register_buffer("memory", torch.zeros(self.num_stuff, memory_size, d))
                self.register_buffer("memory_ptr", torch.zeros(self.num_stuff, dtype=torch.long))
                self.register_buffer("memory_count", torch.zeros(self.num_stuff, dtype=torch.long))
                slot = torch.full((max(num_classes, 1),), -1, dtype=torch.long)
                for i, c in enumerate(self.semantic_classes):
                    if not 0 <= c < num_classes:
                        raise ValueError(f"semantic class {c} outside [0, {num_classes})")
                    slot[c] = i
                self.register_buffer("class_to_slot", slot, persistent=False)
        adaptive = (self.num_thing and thing_init == "scene_adaptive") or (
            self.num_stuff and stuff_init == "scene_adaptive"
        )
        if adaptive and seed_sampler == "topk":
            self.seed_score = nn.Linear(d, 1)
        num_unseeded = (self.num_thing if thing_init == "free" else 0) + (
            self.num_stuff if stuff_init != "scene_adaptive" else 0
        )
        if num_unseeded:
            self.query_embed = nn.Embedding(num_unseeded, d)
        if superpixel:
            self.superpixel_ffn = MLP(d, d, d, 2)

    @property
    def num_queries(self) -> int:
        """Number of thing + stuff queries (superpixel queries are chosen per call)."""
        return self.num_thing + self.num_stuff

    # ---------------------------------------------------------------- memory bank (Eq. 7)
    @torch.no_grad()
    def push(self, slot: int, feats: Tensor) -> None:
        """Enqueue ``feats`` (n, D) into queue ``slot`` (first in, first out).

        The oldest entries are overwritten once the queue holds ``memory_size`` entries; when
        ``n > memory_size`` only the last ``memory_size`` rows are kept.
        """
        n = feats.shape[0]
        if n == 0:
            return
        m = self.memory_size
        if n > m:
            feats = feats[-m:]
            n = m
        ptr = int(self.memory_ptr[slot])
        idx = (torch.arange(n, device=feats.device) + ptr) % m
        self.memory[slot, idx] = feats.to(self.memory.dtype)
        self.memory_ptr[slot] = (ptr + n) % m
        self.memory_count[slot] = min(int(self.memory_count[slot]) + n, m)

    @torch.no_grad()
    def update_memory(self, feats: Tensor, targets: List[Dict[str, Tensor]]) -> None:
        """Push pixel embeddings of every semantic class present in each image.

        A target mask is resized to the feature map by area averaging and a pixel belongs to the
        class where the average is >= 0.5; up to ``memory_samples_per_image`` such pixels per
        class and image are drawn uniformly at random (``torch.randperm``).

        Args:
            feats (Tensor): (B, D, H, W) pixel embeddings (detached here).
            targets (list[dict]): B dicts with "labels" (N,) and "masks" (N, H', W').
        """
        if not hasattr(self, "memory"):
            return
        feats = feats.detach()
        h, w = feats.shape[-2:]
        for b, t in enumerate(targets):
            labels, masks = t["labels"], t["masks"]
            if labels.numel() == 0:
                continue
            slots = self.class_to_slot[labels.clamp(min=0, max=self.class_to_slot.numel() - 1)]
            keep = (slots >= 0) & (labels < self.class_to_slot.numel())
            if not keep.any():
                continue
            small = F.interpolate(masks[keep][None].float(), size=(h, w), mode="area")[0] >= 0.5
            flat = feats[b].flatten(1).t()  # (HW, D)
            for slot, m in zip(slots[keep].tolist(), small.flatten(1)):
                idx = m.nonzero()[:, 0]
                if idx.numel() == 0:
                    continue
                idx = idx[torch.randperm(idx.numel(), device=idx.device)]
                self.push(slot, flat[idx[: self.memory_samples_per_image]])

    def class_centres(self) -> Tensor:
        """Avg_Pool of every queue (Eq. 7), or ``memory_fallback`` for empty queues: (S, D)."""
        count = self.memory_count.clamp(min=1).to(self.memory.dtype)  # (S,)
        # entries beyond the count are still zero, so the sum over the queue is the sum of entries
        mean = self.memory.sum(1) / count[:, None]  # (S, D)
        empty = (self.memory_count == 0)[:, None]
        return torch.where(empty, self.memory_fallback, mean)

    # ---------------------------------------------------------------- seeds (Eq. 8-9)
    def _adaptive_seeds(self, feat: Tensor, pos: Tensor, num: int) -> Tuple[Tensor, Tensor]:
        """(B, num, D) seeds from PE(I) = feat + pos and their positional embedding."""
        pe = feat + pos  # PE(I)
        if self.seed_sampler == "grid":
            coords = grid_seed_coords(num, feat.shape[-2], feat.shape[-1], feat.device)
            return sample_at(pe, coords), sample_at(pos, coords)
        b, d = pe.shape[:2]
        flat = pe.flatten(2).transpose(1, 2)  # (B, HW, D)
        if num > flat.shape[1]:
            raise ValueError(
                f"seed_sampler='topk' needs at least {num} pixels, the map has {flat.shape[1]}"
            )
        score = self.seed_score(flat)[..., 0]  # (B, HW)
        top = score.topk(num, dim=1).indices  # (B, num)
        seeds = flat.gather(1, top[..., None].expand(-1, -1, d))
        seeds = seeds * score.gather(1, top).sigmoid()[..., None]  # gate: gives the scorer a grad
        seed_pos = pos.flatten(2).transpose(1, 2).gather(1, top[..., None].expand(-1, -1, d))
        return seeds, seed_pos

    def forward(
        self,
        feat: Tensor,
        pos: Tensor,
        sp_feat: Optional[Tensor] = None,
        sp_pos: Optional[Tensor] = None,
        num_superpixels: Optional[int] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Initial centres C^(0) and their positional embeddings.

        Args:
            feat (Tensor): (B, D, H, W) pixel embeddings the thing / stuff seeds come from.
            pos (Tensor): (B, D, H, W) positional encoding of ``feat``.
            sp_feat (Tensor or None): (B, D, H4, W4) stride-4 embeddings for superpixel seeds.
            sp_pos (Tensor or None): (B, D, H4, W4) their positional encoding.
            num_superpixels (int or None): K of the superpixel task (50..2500, <= H4 * W4).

        Returns:
            tuple: queries (B, K, D) and query positional embeddings (B, K, D).
        """
        b = feat.shape[0]
        if self.superpixel:
            if sp_feat is None or num_superpixels is None:
                raise ValueError("superpixel queries need sp_feat, sp_pos and num_superpixels")
            check_num_superpixels(num_superpixels, sp_feat.shape[-2] * sp_feat.shape[-1])
            coords = grid_seed_coords(
                num_superpixels, sp_feat.shape[-2], sp_feat.shape[-1], sp_feat.device
            )
            seeds = sample_at(sp_feat + sp_pos, coords)  # Eq. 9: Grid_Sample_K(PE(I))
            return self.superpixel_ffn(seeds), sample_at(sp_pos, coords)

        queries, query_pos = [], []
        unseeded = self.query_embed.weight if hasattr(self, "query_embed") else None
        used = 0
        if self.num_thing:
            if self.thing_init == "free":
                queries.append(self.thing_query_feat.weight[None].expand(b, -1, -1))
                query_pos.append(unseeded[used : used + self.num_thing][None].expand(b, -1, -1))
                used += self.num_thing
            else:
                seeds, seed_pos = self._adaptive_seeds(feat, pos, self.num_thing)
                queries.append(self.thing_ffn(seeds))  # Eq. 8
                query_pos.append(seed_pos)
        if self.num_stuff:
            if self.stuff_init == "scene_adaptive":
                seeds, seed_pos = self._adaptive_seeds(feat, pos, self.num_stuff)
                queries.append(self.stuff_ffn(seeds))
                query_pos.append(seed_pos)
            else:
                if self.stuff_init == "free":
                    q = self.stuff_query_feat.weight
                else:
                    q = self.stuff_ffn(self.class_centres().to(feat.dtype))  # Eq. 7
                queries.append(q[None].expand(b, -1, -1))
                query_pos.append(unseeded[used : used + self.num_stuff][None].expand(b, -1, -1))
                used += self.num_stuff
        return torch.cat(queries, 1), torch.cat(query_pos, 1)

    def extra_repr(self) -> str:
        return (
            f"things={self.num_thing} ({self.thing_init}, {self.seed_sampler}), "
            f"stuff={self.num_stuff} ({self.stuff_init}), memory_size={self.memory_size}, "
            f"superpixel={self.superpixel}"
        )
