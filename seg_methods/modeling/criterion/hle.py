"""Hierarchical Lovász Embeddings: kernels, learned embedding space and losses (HLE Sec. 3.2-3.4).

Kerola et al., "Hierarchical Lovász Embeddings for Proposal-free Panoptic Segmentation" (CVPR
2021). Every pixel i has a unit embedding e_i, an instance variance sigma_i and a seed score s_i.

* Gaussian kernel on the cosine distance (Eq. 7): ``p(e) = exp(-d_cos(e, mu) / (2 sigma^2))`` with
  ``d_cos(a, b) = 1 - a^T b``; :func:`cosine_kernel`.
* Instance kernel with the learned spatial bandwidth (Eq. 8):
  ``phi_l(e_i) = p_l(e_i) exp(-||rho_i - rho_l||^2 / (2 sigma_spatial^2))``;
  :func:`instance_kernel`. mu_l is the (re-normalised) mean embedding of instance l, sigma_l the
  mean predicted variance of its pixels (sigma_hat_l of Eq. 14), rho_l its mean position.
* Semantic scores (Eq. 9): ``psi_k = p_k / sum_c p_c``, a softmax over the logits
  ``-d_cos(e, mu_k) / (2 sigma_k^2)`` with one learned sigma_k per class;
  :meth:`HLEEmbeddingSpace.semantic_logits`.
* Losses (Eq. 11-16), :class:`HLECriterion`: Lovász hinge per instance on phi, Lovász-Softmax on
  psi, seed regression to sg[phi] (0 on stuff), instance-variance loss (gamma = 10) and the
  VQ-VAE-style regression of the persistent class means to the batch means; their sum (Eq. 16).
* Thomson initialisation of the class means (Eq. 17): :func:`thomson_init`.

**What the Lovász hinge is fed.** Eq. 3-4 define the binary loss on a score p in [0, 1] with the
error ``|t - p|``. :func:`~seg_methods.modeling.criterion.lovasz.lovasz_hinge_flat` takes
margins/logits with the error ``max(0, 1 - m (2t - 1))``. Feeding ``m = 2 phi - 1`` gives the error
``2 |t - phi|`` (never clipped, since phi is in [0, 1]), i.e. exactly twice Eq. 3, as in the
SpatialEmbeddings lineage the paper builds on (Neven et al. 2019). The semantic loss gets the
probabilities psi, which is what :func:`~seg_methods.modeling.criterion.lovasz.lovasz_softmax`
takes (its error ``|t - psi_c|`` is Eq. 4 itself).

**Void.** Pixels whose semantic label is void are excluded from every term; pixels whose instance
id is void (crowd segments) are excluded from the instance terms (L_ins, L_seed, L_ins-var) and
kept in the semantic ones. An image without instances, or all void, gives finite losses (0 for
the terms it has no pixel for, still attached to the graph).

Shape shorthand:
    B: batch, D: embedding dimension, C: classes, H, W: padded input size,
    P: valid pixels of one image, L: instances of one image
"""

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .lovasz import lovasz_hinge_flat, lovasz_softmax

__all__ = [
    "INSTANCE_LOSSES",
    "SEMANTIC_LOSSES",
    "SEMANTIC_MEANS",
    "HLECriterion",
    "HLEEmbeddingSpace",
    "associative_embedding_loss",
    "cosine_kernel",
    "instance_kernel",
    "pixel_positions",
    "split_embedding",
    "thomson_energy",
    "thomson_init",
]

INSTANCE_LOSSES = ("lovasz", "bce", "associative")
SEMANTIC_LOSSES = ("lovasz", "cross_entropy", "associative")
SEMANTIC_MEANS = ("persistent", "image")
STUFF_ID, VOID_ID = 0, -1  # instance-id conventions of the "instance_embedding" targets


# --------------------------------------------------------------------------- kernels
def cosine_kernel(d_cos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``exp(-d_cos / (2 sigma^2))`` (broadcasting)."""
    return torch.exp(-d_cos / (2.0 * sigma**2))


def pixel_positions(
    height: int, width: int, coord_scale: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Positions rho of Eq. 8: (row, column) of every pixel divided by ``coord_scale``.

    Returns:
        Tensor: (H * W, 2), row-major.
    """
    ys = torch.arange(height, device=device, dtype=dtype) / coord_scale
    xs = torch.arange(width, device=device, dtype=dtype) / coord_scale
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def instance_kernel(
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    mean: torch.Tensor,
    center: torch.Tensor,
    sigma: torch.Tensor,
    spatial_sigma: torch.Tensor,
) -> torch.Tensor:
    """Eq. 8: ``phi_l(e_i) = exp(-d_cos(e_i, mu_l) / (2 sigma_l^2)) exp(-|rho_i - rho_l|^2 /
    (2 sigma_spatial^2))``.

    Args:
        embeddings (Tensor): (P, D) unit embeddings.
        positions (Tensor): (P, 2) positions rho_i.
        mean (Tensor): (D,) unit instance mean mu_l.
        center (Tensor): (2,) instance position rho_l.
        sigma (Tensor): scalar instance variance sigma_l.
        spatial_sigma (Tensor): scalar spatial bandwidth.

    Returns:
        Tensor: (P,) scores in (0, 1].
    """
    d_cos = 1.0 - embeddings @ mean  # (P,)
    d_pos = ((positions - center) ** 2).sum(dim=1)  # (P,)
    return torch.exp(-d_cos / (2.0 * sigma**2) - d_pos / (2.0 * spatial_sigma**2))


def split_embedding(embeddings: torch.Tensor, split: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(semantic part, instance part) of unit embeddings (B, D, H, W): the same tensor, or with
    ``split`` the first and last D/2 channels, each re-normalised (Table 6 "Split emb. space")."""
    if not split:
        return embeddings, embeddings
    half = embeddings.shape[1] // 2
    return F.normalize(embeddings[:, :half], dim=1), F.normalize(embeddings[:, half:], dim=1)


def thomson_energy(means: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 17 objective: ``sum_{i != j} 1 / d_cos(mu_i, mu_j)`` over the normalised rows of
    ``means`` (K, D)."""
    unit = F.normalize(means, dim=1)
    d_cos = (1.0 - unit @ unit.t()).clamp_min(eps)  # (K, K)
    off = ~torch.eye(means.shape[0], dtype=torch.bool, device=means.device)
    return (1.0 / d_cos)[off].sum()


def thomson_init(
    num: int, dim: int, *, iters: int = 500, lr: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """Class means spread over the unit sphere S^{dim-1} (Eq. 17, a local minimum by descent).

    Starts from a seeded Gaussian draw (deterministic), then runs ``iters`` Adam steps on
    :func:`thomson_energy` of the normalised points.

    Returns:
        Tensor: (num, dim) float32 unit vectors.
    """
    gen = torch.Generator().manual_seed(int(seed))
    # on the CPU explicitly: deterministic, and computed even when the model is built on "meta"
    x = torch.randn(num, dim, generator=gen, dtype=torch.float64, device="cpu")
    if num > 1 and iters > 0:
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                opt.zero_grad()
                energy = thomson_energy(x) / (num * (num - 1))
                energy.backward()
                opt.step()
    return F.normalize(x.detach(), dim=1).to(torch.float32)


class HLEEmbeddingSpace(nn.Module):
    """The learned parts of the embedding space: persistent class means mu_hat_k (Eq. 10, 15),
    per-class semantic variances sigma_k (Eq. 9) and the spatial bandwidth (Eq. 8).

    Args:
        num_classes (int): C.
        dim (int): dimension of the semantic embedding (d, or d/2 with a split space).
        semantic_sigma_init (float): initial sigma_k.
        spatial_sigma_init (float): initial sigma_spatial (positions in COORD_SCALE units).
        thomson (bool): Thomson initialisation of the means (Eq. 17), else a seeded Gaussian draw.
        thomson_iters, thomson_lr, thomson_seed: see :func:`thomson_init`.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        semantic_sigma_init: float = 1.0,
        spatial_sigma_init: float = 0.5,
        thomson: bool = True,
        thomson_iters: int = 500,
        thomson_lr: float = 0.05,
        thomson_seed: int = 0,
    ):
        super().__init__()
        if semantic_sigma_init <= 0 or spatial_sigma_init <= 0:
            raise ValueError(
                "MODEL.HLE.SEMANTIC_SIGMA_INIT and MODEL.HLE.SPATIAL_SIGMA_INIT must be > 0, got "
                f"{semantic_sigma_init} and {spatial_sigma_init}"
            )
        means = thomson_init(
            num_classes,
            dim,
            iters=thomson_iters if thomson else 0,
            lr=thomson_lr,
            seed=thomson_seed,
        )
        self.class_means = nn.Parameter(means)  # (C, D), mu_hat_k (normalised where used)
        self.log_semantic_sigma = nn.Parameter(
            torch.full((num_classes,), math.log(semantic_sigma_init))
        )
        self.log_spatial_sigma = nn.Parameter(torch.tensor(math.log(spatial_sigma_init)))

    @property
    def spatial_sigma(self) -> torch.Tensor:
        return self.log_spatial_sigma.exp()

    @property
    def semantic_sigma(self) -> torch.Tensor:
        return self.log_semantic_sigma.exp()

    def unit_means(self) -> torch.Tensor:
        """(C, D) normalised persistent class means."""
        return F.normalize(self.class_means, dim=1)

    def semantic_logits(
        self, embeddings: torch.Tensor, means: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits of Eq. 9: ``log p_k = -d_cos(e, mu_k) / (2 sigma_k^2)``; softmax over C is psi.

        Args:
            embeddings (Tensor): (B, D, H, W) unit embeddings.
            means (Tensor or None): (C, D) or per-image (B, C, D) unit means; default the
                persistent ones.

        Returns:
            Tensor: (B, C, H, W).
        """
        if means is None:
            means = self.unit_means()
        if means.dim() == 2:
            cos = torch.einsum("bdhw,cd->bchw", embeddings, means)
        else:
            cos = torch.einsum("bdhw,bcd->bchw", embeddings, means)
        var2 = 2.0 * self.semantic_sigma.view(1, -1, 1, 1) ** 2
        return -(1.0 - cos) / var2


# --------------------------------------------------------------------------- losses
def associative_embedding_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, delta_pull: float, delta_push: float
) -> torch.Tensor:
    """Associative-embedding loss (Eq. 1 + Eq. 2, L1 distances) of one image.

    Args:
        embeddings (Tensor): (P, D).
        labels (Tensor): (P,) group ids (instances or classes), all valid.
        delta_pull, delta_push (float): hinge margins.

    Returns:
        Tensor: scalar pull + push; 0 (on the graph) without groups; push 0 with one group.
    """
    zero = embeddings.sum() * 0.0
    groups = labels.unique()
    if groups.numel() == 0:
        return zero
    pulls, means = [], []
    for g in groups:
        e = embeddings[labels == g]  # (|I_l|, D)
        mean = e.mean(dim=0)
        means.append(mean)
        pulls.append((F.relu((e - mean).abs().sum(dim=1) - delta_pull) ** 2).mean())
    loss = torch.stack(pulls).mean()  # Eq. 1
    if len(means) > 1:
        m = torch.stack(means)  # (L, D)
        dist = torch.cdist(m, m, p=1)  # (L, L)
        off = ~torch.eye(len(means), dtype=torch.bool, device=m.device)
        loss = loss + (F.relu(delta_push - dist[off]) ** 2).mean()  # Eq. 2
    return loss


class HLECriterion(nn.Module):
    """The HLE losses of Eq. 11-16 (and the Table 6 ablation variants).

    Args:
        num_classes (int): C.
        ignore_value (int): void label of the semantic map.
        weights (dict): "seg", "seg_mean", "ins", "ins_var" (gamma of Eq. 14), "seed".
        seg_lovasz_classes (str): "present" or "all" (Eq. 12).
        semantic_means (str): see :data:`SEMANTIC_MEANS` (Eq. 10).
        instance_loss (str): see :data:`INSTANCE_LOSSES`.
        semantic_loss (str): see :data:`SEMANTIC_LOSSES`.
        vq_loss (bool): add L_seg-mean (Eq. 15).
        ae_instance_deltas, ae_semantic_deltas (tuple[float, float]): associative margins.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        ignore_value: int,
        weights: Dict[str, float],
        seg_lovasz_classes: str = "present",
        semantic_means: str = "persistent",
        instance_loss: str = "lovasz",
        semantic_loss: str = "lovasz",
        vq_loss: bool = True,
        ae_instance_deltas: Tuple[float, float] = (0.5, 1.5),
        ae_semantic_deltas: Tuple[float, float] = (1.0, 3.0),
    ):
        super().__init__()
        for key, value, allowed in (
            ("INSTANCE_LOSS", instance_loss, INSTANCE_LOSSES),
            ("SEMANTIC_LOSS", semantic_loss, SEMANTIC_LOSSES),
            ("SEMANTIC_MEANS", semantic_means, SEMANTIC_MEANS),
            ("SEG_LOVASZ_CLASSES", seg_lovasz_classes, ("present", "all")),
        ):
            if value not in allowed:
                raise ValueError(f"MODEL.HLE.{key} must be one of {allowed}, got {value!r}")
        missing = {"seg", "seg_mean", "ins", "ins_var", "seed"} - set(weights)
        if missing:
            raise ValueError(f"HLECriterion: loss weights {sorted(missing)} missing")
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.weights = dict(weights)
        self.seg_lovasz_classes = seg_lovasz_classes
        self.semantic_means = semantic_means
        self.instance_loss = instance_loss
        self.semantic_loss = semantic_loss
        self.vq_loss = vq_loss
        _check_deltas("AE_INSTANCE_DELTAS", ae_instance_deltas)
        _check_deltas("AE_SEMANTIC_DELTAS", ae_semantic_deltas)
        self.ae_instance_deltas = tuple(float(v) for v in ae_instance_deltas)
        self.ae_semantic_deltas = tuple(float(v) for v in ae_semantic_deltas)

    @classmethod
    def from_config(cls, cfg):
        h = cfg.MODEL.HLE
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "weights": {
                "seg": h.SEG_WEIGHT,
                "seg_mean": h.SEG_MEAN_WEIGHT,
                "ins": h.INS_WEIGHT,
                "ins_var": h.INS_VAR_WEIGHT,
                "seed": h.SEED_WEIGHT,
            },
            "seg_lovasz_classes": h.SEG_LOVASZ_CLASSES,
            "semantic_means": h.SEMANTIC_MEANS,
            "instance_loss": h.INSTANCE_LOSS,
            "semantic_loss": h.SEMANTIC_LOSS,
            "vq_loss": h.VQ_LOSS,
            "ae_instance_deltas": tuple(h.AE_INSTANCE_DELTAS),
            "ae_semantic_deltas": tuple(h.AE_SEMANTIC_DELTAS),
        }

    # ------------------------------------------------------------------ semantic terms
    def class_batch_means(
        self, sem_embeddings: torch.Tensor, sem_labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean of the (semantic) embeddings over the batch's valid pixels.

        Args:
            sem_embeddings (Tensor): (B, D, H, W) unit embeddings.
            sem_labels (Tensor): (B, H, W) labels or void.

        Returns:
            (Tensor, Tensor): (C, D) unit means mu_k^batch (0 rows for absent classes) and (C,)
            bool "present".
        """
        d = sem_embeddings.shape[1]
        flat_e = sem_embeddings.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
        flat_l = sem_labels.reshape(-1)
        valid = flat_l != self.ignore_value
        sums = flat_e.new_zeros(self.num_classes, d).index_add_(0, flat_l[valid], flat_e[valid])
        counts = torch.bincount(flat_l[valid], minlength=self.num_classes)
        return F.normalize(sums, dim=1), counts > 0

    def image_class_means(
        self, sem_embeddings: torch.Tensor, sem_labels: torch.Tensor, space: HLEEmbeddingSpace
    ) -> torch.Tensor:
        """Eq. 10 with ``SEMANTIC_MEANS = "image"``: per image, the ground-truth mean embedding of
        each class present in it, the persistent mean of the others. Returns (B, C, D) unit."""
        persistent = space.unit_means()
        out = []
        for e, lab in zip(sem_embeddings, sem_labels):
            means, present = self.class_batch_means(e[None], lab[None])
            out.append(torch.where(present[:, None], means, persistent))
        return torch.stack(out)

    def semantic_terms(
        self,
        sem_embeddings: torch.Tensor,
        sem_labels: torch.Tensor,
        space: HLEEmbeddingSpace,
        class_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """L_seg (Eq. 12, or the ablation's loss) and L_seg-mean (Eq. 15).

        Args:
            sem_embeddings (Tensor): (B, D, H, W) unit embeddings (the semantic part).
            sem_labels (Tensor): (B, H, W) labels with void.
            space (HLEEmbeddingSpace): means and variances.
            class_logits (Tensor or None): (B, C, H, W) logits of a separate classifier branch
                (Table 6 "Sep. seg. branch"); then the embedding carries no class term.
        """
        out = {}
        if class_logits is None:
            means = None
            if self.semantic_means == "image":
                means = self.image_class_means(sem_embeddings, sem_labels, space)
            class_logits = space.semantic_logits(sem_embeddings, means)  # (B, C, H, W)
            embedding_classes = True
        else:
            embedding_classes = False
        if self.semantic_loss == "lovasz":
            psi = class_logits.softmax(dim=1)  # Eq. 9
            out["loss_seg"] = lovasz_softmax(
                psi, sem_labels, classes=self.seg_lovasz_classes, ignore=self.ignore_value
            )
        elif self.semantic_loss == "cross_entropy":
            valid = sem_labels != self.ignore_value
            if bool(valid.any()):
                out["loss_seg"] = F.cross_entropy(
                    class_logits, sem_labels, ignore_index=self.ignore_value
                )
            else:
                out["loss_seg"] = class_logits.sum() * 0.0
        else:  # associative, on the classes (the semantic level of the hierarchical AE)
            losses = []
            d = sem_embeddings.shape[1]
            for e, lab in zip(sem_embeddings, sem_labels):
                valid = lab != self.ignore_value
                losses.append(
                    associative_embedding_loss(
                        e.permute(1, 2, 0)[valid].reshape(-1, d),
                        lab[valid],
                        *self.ae_semantic_deltas,
                    )
                )
            out["loss_seg"] = torch.stack(losses).mean()
            if embedding_classes:
                # Decoding still classifies by psi: fit the class kernels (means, sigma_k) to the
                # detached embeddings with a cross-entropy that does not reach the network.
                detached_logits = space.semantic_logits(sem_embeddings.detach())
                out["loss_seg"] = out["loss_seg"] + self._kernel_fit_ce(detached_logits, sem_labels)
            else:
                out["loss_seg"] = out["loss_seg"] + self._kernel_fit_ce(class_logits, sem_labels)
        if embedding_classes and self.vq_loss:
            batch_means, present = self.class_batch_means(sem_embeddings.detach(), sem_labels)
            if bool(present.any()):
                diff = space.class_means[present] - batch_means[present]  # sg on batch means
                out["loss_seg_mean"] = (diff**2).sum(dim=1).mean()  # Eq. 15
            else:
                out["loss_seg_mean"] = space.class_means.sum() * 0.0
        return out

    def _kernel_fit_ce(self, class_logits: torch.Tensor, sem_labels: torch.Tensor) -> torch.Tensor:
        valid = sem_labels != self.ignore_value
        if not bool(valid.any()):
            return class_logits.sum() * 0.0
        return F.cross_entropy(class_logits, sem_labels, ignore_index=self.ignore_value)

    # ------------------------------------------------------------------ instance terms
    def instance_terms(
        self,
        ins_embeddings: torch.Tensor,
        ins_sigma: torch.Tensor,
        seed: torch.Tensor,
        instance_ids: torch.Tensor,
        positions: torch.Tensor,
        space: HLEEmbeddingSpace,
    ) -> Dict[str, torch.Tensor]:
        """L_ins (Eq. 11), L_seed (Eq. 13) and L_ins-var (Eq. 14).

        Args:
            ins_embeddings (Tensor): (B, D, H, W) unit embeddings (the instance part).
            ins_sigma (Tensor): (B, H, W) predicted instance variances sigma_i > 0.
            seed (Tensor): (B, H, W) seed scores s_i in (0, 1).
            instance_ids (Tensor): (B, H, W) int64: k >= 1 instance, 0 stuff, -1 void (already
                void wherever the semantic label is void).
            positions (Tensor): (H * W, 2) positions rho.
            space (HLEEmbeddingSpace): the spatial bandwidth.

        Returns:
            dict: "loss_ins", "loss_ins_var", "loss_seed" (unweighted).
        """
        d = ins_embeddings.shape[1]
        spatial_sigma = space.spatial_sigma
        ins_losses, var_sq, var_count = [], [], 0
        seed_sq = []
        num_seed_pixels = 0
        for e, sig, s, ids in zip(ins_embeddings, ins_sigma, seed, instance_ids):
            valid = ids.reshape(-1) >= 0  # stuff + instance pixels
            if not bool(valid.any()):
                continue
            e_v = e.reshape(d, -1).t()[valid]  # (P, D)
            sig_v, s_v = sig.reshape(-1)[valid], s.reshape(-1)[valid]  # (P,)
            ids_v, pos_v = ids.reshape(-1)[valid], positions[valid]  # (P,), (P, 2)
            seed_target = torch.zeros_like(s_v)  # Eq. 13: stuff regressed to 0
            if self.instance_loss == "associative":
                inst = ids_v > 0
                if bool(inst.any()):
                    ins_losses.append(
                        associative_embedding_loss(e_v[inst], ids_v[inst], *self.ae_instance_deltas)
                    )
            for k in ids_v[ids_v > 0].unique():
                member = ids_v == k  # (P,) t_ins
                mean = F.normalize(e_v[member].mean(dim=0), dim=0)  # mu_l (Eq. 10)
                center = pos_v[member].mean(dim=0)  # rho_l
                sigma_l = sig_v[member].mean()  # sigma_hat_l
                phi = instance_kernel(e_v, pos_v, mean, center, sigma_l, spatial_sigma)  # (P,)
                if self.instance_loss == "lovasz":
                    ins_losses.append(lovasz_hinge_flat(2.0 * phi - 1.0, member.long()))  # Eq. 11
                elif self.instance_loss == "bce":
                    ins_losses.append(
                        F.binary_cross_entropy(phi.clamp(1e-6, 1 - 1e-6), member.to(phi.dtype))
                    )
                seed_target[member] = phi[member].detach()  # sg[phi_l(e_i)]
                var_sq.append(((sig_v[member] - sigma_l.detach()) ** 2).sum())  # Eq. 14
                var_count += int(member.sum())
            seed_sq.append(((s_v - seed_target) ** 2).sum())
            num_seed_pixels += int(valid.sum())
        zero = (
            ins_embeddings.sum() * 0.0
            + ins_sigma.sum() * 0.0
            + seed.sum() * 0.0
            + spatial_sigma * 0.0
        )
        return {
            "loss_ins": torch.stack(ins_losses).mean() if ins_losses else zero,
            "loss_ins_var": torch.stack(var_sq).sum() / var_count if var_count else zero,
            "loss_seed": (
                torch.stack(seed_sq).sum() / num_seed_pixels if num_seed_pixels else zero
            ),
        }

    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        sem_labels: torch.Tensor,
        instance_ids: torch.Tensor,
        space: HLEEmbeddingSpace,
        positions: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of Eq. 16 (each already a mean over its pixels / instances / classes).

        Args:
            outputs (dict): at the label resolution (B, *, H, W): "sem_embedding" and
                "ins_embedding" (unit; the same tensor unless the space is split),
                "ins_sigma", "seed" and optionally "class_logits" (separate branch).
            sem_labels (Tensor): (B, H, W) labels with void.
            instance_ids (Tensor): (B, H, W): k >= 1 instance, 0 stuff, -1 void.
            space (HLEEmbeddingSpace): learned means and variances.
            positions (Tensor): (H * W, 2) rho.

        Returns:
            dict: "loss_seg", "loss_ins", "loss_ins_var", "loss_seed" and, when the classes live
            in the embedding and VQ_LOSS is on, "loss_seg_mean".
        """
        void = sem_labels == self.ignore_value
        instance_ids = instance_ids.masked_fill(void, VOID_ID)  # void excluded everywhere
        losses = self.semantic_terms(
            outputs["sem_embedding"], sem_labels, space, outputs.get("class_logits")
        )
        losses.update(
            self.instance_terms(
                outputs["ins_embedding"],
                outputs["ins_sigma"],
                outputs["seed"],
                instance_ids,
                positions,
                space,
            )
        )
        key_weight = {
            "loss_seg": "seg",
            "loss_seg_mean": "seg_mean",
            "loss_ins": "ins",
            "loss_ins_var": "ins_var",
            "loss_seed": "seed",
        }
        return {k: v * self.weights[key_weight[k]] for k, v in losses.items()}


def _check_deltas(name: str, deltas: Sequence[float]) -> None:
    if len(deltas) != 2:
        raise ValueError(f"MODEL.HLE.{name} must be [delta_pull, delta_push], got {deltas}")
