"""HSSN losses and tree utilities (Li et al., "Deep Hierarchical Semantic Segmentation", CVPR 2022).

Pure functions of tensors and a :class:`ClassTree`, the class hierarchy of the dataset metadata
(``class_hierarchy``: ``{"names": [...], "parents": [...]}``, see
``seg_methods/data/target_generators/hierarchy.py``). Node ids are global: the level-0 classes
(leaves) first, then level 1, ... (the ports' channel order, e.g. Cityscapes: 19 classes, then 7
super-classes). The top level may hold several nodes (an implicit root sits above it).

* :func:`tree_min_logits`: the tree-constrained scores of Def. 3.2.3-3.2.4, in logit space
  (sigmoid is monotone, so min/max of sigmoids = sigmoid of min/max of logits).
* :func:`tree_min_loss`: Eq. 5 (tree-min) and its focal form Eq. 6, each level normalised by its
  valid pixels and its node count.
* :func:`per_level_cross_entropy`: the ports' extra softmax cross-entropy per level.
* :func:`tree_triplet_loss`: Eq. 7 with the hierarchy-aware margin.
* :func:`leaf_path_logits`: tree-respecting inference scores of the leaves.

The Mask2Former variant (``MODEL.HSSN.BASE: "mask2former"``) uses the same functions with the
query in the place of the pixel: :func:`tree_min_query_losses` (Eq. 5/6 per query, "no object" =
every node negative), :func:`tree_class_cost` (matching), :class:`HSSNSetCriterion` /
:func:`build_hssn_set_criterion`, :func:`tree_semantic_inference` and
:func:`semantic_labels_from_masks` (per-pixel labels of the triplet loss from the targets' masks).

Void pixels are excluded from every term (the ports overwrite void with class 0 in place; we do
not), and an all-void batch gives 0 (attached to the graph), never NaN.

Shape shorthand:
    B: batch, N: tree nodes, C: leaves (level-0 classes), L: levels, H, W: pixels, D: embedding.
"""

import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ...data.datasets.class_tables import hierarchy_from_parent_map
from ...data.target_generators.hierarchy import ClassHierarchyTargets, hierarchy_lookup
from ..matcher import HungarianMatcher
from ..meta_arch.per_pixel import per_pixel_cross_entropy
from .base import expand_aux_weights
from .set_criterion import SetCriterion

__all__ = [
    "ClassTree",
    "tree_min_logits",
    "tree_min_loss",
    "per_level_cross_entropy",
    "tree_distances",
    "tree_triplet_loss",
    "triplet_ramp",
    "leaf_path_logits",
    "tree_min_query_losses",
    "tree_class_cost",
    "tree_semantic_inference",
    "semantic_labels_from_masks",
    "HSSNSetCriterion",
    "build_hssn_set_criterion",
]


class ClassTree:
    """The class tree of a ``class_hierarchy`` metadata entry, with the index tables HSSN needs.

    The level format (a parent index per node) cannot express a cycle or a node with two
    parents; the checks here are those left: consistent lengths, parent indices in range (both by
    :class:`ClassHierarchyTargets`), as many leaves as the model's classes, and no childless
    node above level 0. A tree written as a child -> parent map of names, where a cycle, a
    missing class or two roots can occur, goes through :meth:`from_parent_map`, which rejects
    them; :meth:`parent_map` gives that form back (tests check every registered tree with it).

    Attributes:
        level_sizes (list[int]): nodes per level (level 0 = leaves).
        offsets (list[int]): global id of each level's first node.
        parents (list[list[int]]): ``parents[l][i]`` the level-(l+1) index of node i of level l.
        ancestors (Tensor): (L, C) int64, level-l ancestor (level index) of every leaf.
        paths (Tensor): (L, C) int64, global node id of every leaf's level-l ancestor.
    """

    def __init__(self, hierarchy: Mapping, num_classes: Optional[int] = None, source: str = ""):
        """
        Args:
            hierarchy (Mapping): ``{"names": [[...], ...], "parents": [[...], ...]}``.
            num_classes (int or None): expected number of leaves (e.g.
                ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``); None skips the check.
            source (str): where the tree comes from, for error messages.
        """
        where = f" ({source})" if source else ""
        if not isinstance(hierarchy, Mapping) or not {"names", "parents"} <= set(hierarchy):
            raise ValueError(f"class_hierarchy{where} must be a dict with 'names' and 'parents'")
        ClassHierarchyTargets(class_hierarchy=hierarchy)  # lengths and parent ranges
        names = hierarchy["names"]
        self.names: List[List[str]] = [list(n) for n in names]
        self.parents: List[List[int]] = [[int(p) for p in par] for par in hierarchy["parents"]]
        self.level_sizes: List[int] = [len(n) for n in names]
        if num_classes is not None and self.level_sizes[0] != num_classes:
            raise ValueError(
                f"class_hierarchy{where} has {self.level_sizes[0]} level-0 classes but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}: every class must be a leaf"
            )
        for level, par in enumerate(self.parents):
            childless = sorted(set(range(self.level_sizes[level + 1])) - set(par))
            if childless:
                raise ValueError(
                    f"class_hierarchy{where}: level-{level + 1} nodes "
                    f"{[names[level + 1][i] for i in childless]} have no child"
                )
        self.offsets: List[int] = [sum(self.level_sizes[:l]) for l in range(len(names))]
        self.ancestors = hierarchy_lookup(self.parents, self.level_sizes[0])  # (L, C)
        self.paths = self.ancestors + torch.tensor(self.offsets).view(-1, 1)  # (L, C)

    @classmethod
    def from_parent_map(
        cls,
        classes: List[str],
        parent_of: Mapping[str, Optional[str]],
        num_classes: Optional[int] = None,
        source: str = "",
    ) -> "ClassTree":
        """The tree of a child -> parent map of node names, checked: no cycle, exactly one root
        (dropped: the implicit root), every class present and a leaf, one depth for all classes
        (:func:`~seg_methods.data.datasets.class_tables.hierarchy_from_parent_map`).

        Raises:
            ValueError: naming the cycle, the missing classes or the roots.
        """
        where = f" ({source})" if source else ""
        try:
            hierarchy = hierarchy_from_parent_map(classes, parent_of)
        except ValueError as e:
            raise ValueError(f"class_hierarchy{where}: {e}") from None
        return cls(hierarchy, num_classes, source)

    def parent_map(self) -> Dict[str, Optional[str]]:
        """The tree as a child -> parent map (the inverse of :meth:`from_parent_map`).

        Node ids are ``"<level>.<index>:<name>"`` (names may repeat across levels); the top
        level's nodes have the implicit root ``"root"`` as parent, which maps to None.
        """

        def node(level: int, i: int) -> str:
            return f"{level}.{i}:{self.names[level][i]}"

        out: Dict[str, Optional[str]] = {"root": None}
        for level in range(self.num_levels):
            for i in range(self.level_sizes[level]):
                top = level == self.num_levels - 1
                out[node(level, i)] = "root" if top else node(level + 1, self.parents[level][i])
        return out

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def num_leaves(self) -> int:
        return self.level_sizes[0]

    @property
    def num_nodes(self) -> int:
        return sum(self.level_sizes)

    def level(self, node_tensor: torch.Tensor, level: int) -> torch.Tensor:
        """The level-``level`` channels of a (B, N, ...) node tensor: (B, n_level, ...)."""
        return node_tensor[:, self.offsets[level] : self.offsets[level] + self.level_sizes[level]]

    def level_labels(self, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
        """(...) leaf labels (void = ``ignore_value``) -> (L, ...) level labels, void kept."""
        void = targets == ignore_value
        bad = ~void & ((targets < 0) | (targets >= self.num_leaves))
        if bad.any():
            raise ValueError(
                f"labels {sorted(set(targets[bad].tolist()))} are outside the tree's "
                f"{self.num_leaves} leaves and are not the void label {ignore_value}"
            )
        lut = self.ancestors.to(targets.device)
        return lut[:, targets.masked_fill(void, 0)].masked_fill(void.unsqueeze(0), ignore_value)


def tree_min_logits(node_logits: torch.Tensor, tree: ClassTree):
    """Tree-constrained positive and negative scores (Def. 3.2.3-3.2.4), as logits.

    The positive score of node v is the minimum over v and all its ancestors; the negative score
    the maximum over v and its whole subtree. Then s_v <= s_u for every ancestor u of a
    positive v, and 1 - s_v <= 1 - s_u for every descendant u of a negative v.

    Args:
        node_logits (Tensor): (B, N, H, W) one logit per tree node.
        tree (ClassTree): the tree.

    Returns:
        (Tensor, Tensor): positive and negative logits, (B, N, H, W) each.
    """
    L = tree.num_levels
    levels = [tree.level(node_logits, l) for l in range(L)]
    pos = [None] * L
    pos[L - 1] = levels[L - 1]
    for l in range(L - 2, -1, -1):  # top-down: min with the parent's (already path-min) score
        par = torch.as_tensor(tree.parents[l], device=node_logits.device)
        pos[l] = torch.minimum(levels[l], pos[l + 1].index_select(1, par))
    neg = [levels[0]]
    for l in range(L - 1):  # bottom-up: max with the children's (already subtree-max) scores
        par = torch.as_tensor(tree.parents[l], device=node_logits.device)
        index = par.view(1, -1, 1, 1).expand_as(neg[l])
        neg.append(levels[l + 1].scatter_reduce(1, index, neg[l], "amax", include_self=True))
    return torch.cat(pos, dim=1), torch.cat(neg, dim=1)


def _tree_min_terms(p: torch.Tensor, q: torch.Tensor, focal: bool, gamma: float):
    """Per-node terms of Eq. 5 / Eq. 6 from positive / negative logits p, q (same shape):
    ``-q^g log(1 - q)`` for a negative and ``-(1 - p)^g log p`` for a positive (sigmoids of the
    logits; g = 0 without focal). Returns (negative terms, positive terms)."""
    neg_term = -F.logsigmoid(-q)  # -log(1 - q)
    pos_term = -F.logsigmoid(p)  # -log p
    if focal:
        neg_term = neg_term * torch.sigmoid(q).pow(gamma)
        pos_term = pos_term * torch.sigmoid(-p).pow(gamma)  # (1 - p)^g
    return neg_term, pos_term


def tree_min_loss(
    node_logits: torch.Tensor,
    targets: torch.Tensor,
    tree: ClassTree,
    *,
    ignore_value: int,
    focal: bool = True,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Tree-min loss (Eq. 5) or focal tree-min loss (Eq. 6).

    For every valid pixel and level l with ground-truth node y (the level-l ancestor of the
    pixel's class), with p = sigmoid(positive logit), q = sigmoid(negative logit):

        sum over the level's nodes v of  -[v = y] (1 - p_v)^g log p_v - [v != y] q_v^g log(1 - q_v)

    (g = 0 without focal), summed over valid pixels and divided by (#valid pixels x #level nodes),
    then summed over levels.

    Args:
        node_logits (Tensor): (B, N, H, W).
        targets (Tensor): (B, H, W) int64 leaf labels, ``ignore_value`` on void.
        tree (ClassTree): the tree.
        ignore_value (int): void label.
        focal (bool): Eq. 6 instead of Eq. 5.
        gamma (float): focusing exponent of Eq. 6.

    Returns:
        Tensor: scalar; 0 (attached to ``node_logits``) when no pixel is valid.
    """
    if node_logits.shape[1] != tree.num_nodes:
        raise ValueError(f"{node_logits.shape[1]} node logits for a tree of {tree.num_nodes} nodes")
    valid = targets != ignore_value  # (B, H, W)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return node_logits.sum() * 0.0
    pos, neg = tree_min_logits(node_logits, tree)
    labels = tree.level_labels(targets, ignore_value)  # (L, B, H, W)
    total = node_logits.new_zeros(())
    for l in range(tree.num_levels):
        p, q = tree.level(pos, l), tree.level(neg, l)  # (B, n_l, H, W)
        neg_term, pos_term = _tree_min_terms(p, q, focal, gamma)
        y = labels[l].masked_fill(~valid, 0).unsqueeze(1)  # (B, 1, H, W)
        per_pixel = (
            neg_term.sum(1) - neg_term.gather(1, y).squeeze(1) + pos_term.gather(1, y).squeeze(1)
        )  # (B, H, W)
        total = total + per_pixel[valid].sum() / (num_valid * tree.level_sizes[l])
    return total


def per_level_cross_entropy(
    node_logits: torch.Tensor, targets: torch.Tensor, tree: ClassTree, *, ignore_value: int
) -> torch.Tensor:
    """The ports' extra loss: softmax cross-entropy over each level's nodes, summed over levels.

    Args:
        node_logits (Tensor): (B, N, H, W).
        targets (Tensor): (B, H, W) leaf labels, ``ignore_value`` on void (excluded).
        tree (ClassTree): the tree.
        ignore_value (int): void label.

    Returns:
        Tensor: scalar (0 when no pixel is valid).
    """
    labels = tree.level_labels(targets, ignore_value)
    return sum(
        per_pixel_cross_entropy(tree.level(node_logits, l), labels[l], ignore_value=ignore_value)
        for l in range(tree.num_levels)
    )


def tree_distances(ancestors: torch.Tensor) -> torch.Tensor:
    """Tree distance psi (number of edges) between every two leaves.

    Two leaves whose first common ancestor is at level k are 2k edges apart; leaves without a
    common ancestor meet at the implicit root above the top level (k = L).

    Args:
        ancestors (Tensor): (L, C) level-l ancestor of every leaf (:attr:`ClassTree.ancestors`).

    Returns:
        Tensor: (C, C) int64.
    """
    L = ancestors.shape[0]
    same = ancestors.unsqueeze(2) == ancestors.unsqueeze(1)  # (L, C, C)
    # same[l] implies same[l + 1]: the first common level is L minus the number of common levels
    return 2 * (L - same.sum(0))


def tree_triplet_loss(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    tree: ClassTree,
    *,
    ignore_value: int,
    max_triplets_per_class: int = 200,
    margin_eps: float = 0.1,
    margin_tree_factor: float = 1.0,
    include_anchor_class: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Tree-triplet loss (Eq. 7) on L2-normalised pixel embeddings.

    For every class c present: anchors are pixels of c; positives are pixels of the OTHER classes
    with the same level-1 ancestor as c (as the ports; a class alone under its parent, e.g.
    Cityscapes' "sky", then gets no triplet), or of any class under that ancestor, c included,
    with ``include_anchor_class``; negatives are pixels under another level-1 node. A one-level
    tree uses the class itself as the group (and always includes c). ``k = min(#anchors,
    #positives, #negatives, max_triplets_per_class)`` of each are drawn at random (the ports take
    the first k in raster order), and with the cosine distance d = 1 - <e, e'>:

        l = max(d(a, +) - d(a, -) + m, 0),  m = margin_eps + factor (psi(a, -) - psi(a, +)) / 2D

    psi the tree distance (:func:`tree_distances`), D the number of levels. The loss is the mean
    over each class's triplets, averaged over the classes with at least one triplet.

    Args:
        embeddings (Tensor): (B, D, h, w), L2-normalised along D.
        targets (Tensor): (B, h, w) leaf labels at the embedding resolution, ``ignore_value`` on
            void (never anchor, positive or negative).
        tree (ClassTree): the tree.
        ignore_value (int): void label.
        max_triplets_per_class (int): k's upper bound.
        margin_eps (float): m_eps.
        margin_tree_factor (float): factor of the tree term (paper 0.5, ports' constant = 1).
        include_anchor_class (bool): positives may be pixels of the anchor's own class (then a
            same-class positive has psi = 0 and the margin grows by ``factor / 2``; with the
            ports' factor 1 that is 1.1 instead of 0.6, so use the paper's 0.5 with it).
        generator (torch.Generator, optional): for the random draws.

    Returns:
        Tensor: scalar; 0 (attached to ``embeddings``) when no class has a triplet.
    """
    feats = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])  # (P, D)
    labels = targets.reshape(-1)
    valid = labels != ignore_value
    feats, labels = feats[valid], labels[valid]
    if labels.numel() == 0:
        return embeddings.sum() * 0.0
    ancestors = tree.ancestors.to(labels.device)
    group_of = ancestors[min(1, tree.num_levels - 1)]  # (C,) grouping for positives
    psi = tree_distances(ancestors).to(feats.dtype)  # (C, C)
    groups = group_of[labels]  # (P,)

    def draw(index: torch.Tensor, k: int) -> torch.Tensor:
        perm = torch.randperm(index.numel(), generator=generator)[:k]
        return index[perm.to(index.device)]

    losses = []
    for c in torch.unique(labels).tolist():
        anchors = torch.nonzero(labels == c).squeeze(1)
        same = groups == group_of[c]
        positive = same if (include_anchor_class or tree.num_levels == 1) else same & (labels != c)
        positives, negatives = torch.nonzero(positive).squeeze(1), torch.nonzero(~same).squeeze(1)
        k = min(anchors.numel(), positives.numel(), negatives.numel(), max_triplets_per_class)
        if k == 0:
            continue
        a, p, n = draw(anchors, k), draw(positives, k), draw(negatives, k)
        d_pos = 1.0 - (feats[a] * feats[p]).sum(1)
        d_neg = 1.0 - (feats[a] * feats[n]).sum(1)
        margin = margin_eps + margin_tree_factor * (psi[c, labels[n]] - psi[c, labels[p]]) / (
            2 * tree.num_levels
        )
        losses.append(F.relu(d_pos - d_neg + margin).mean())
    if not losses:
        return embeddings.sum() * 0.0
    return torch.stack(losses).mean()


def triplet_ramp(step: int, final_weight: float, ramp_iters: int) -> float:
    """Triplet weight at ``step``: cosine ramp from 0 to ``final_weight`` over ``ramp_iters``
    (the ports' ``1/4 (1 + cos((step - 80k) / 80k pi))``), constant afterwards."""
    if ramp_iters <= 0 or step >= ramp_iters:
        return float(final_weight)
    return float(final_weight) * 0.5 * (1.0 - math.cos(math.pi * step / ramp_iters))


def leaf_path_logits(node_logits: torch.Tensor, tree: ClassTree, rule: str) -> torch.Tensor:
    """Tree-respecting leaf scores: every leaf scored by its whole root path.

    Also used on other node scores of the same layout: the per-query node logits of the
    Mask2Former variant, (Q, N) -> (Q, C) (its matching cost), and its per-pixel node scores
    (sum over queries of mask x node probability).

    Args:
        node_logits (Tensor): (B, N, ...) node scores along dim 1, e.g. (B, N, H, W) or (Q, N).
        tree (ClassTree): the tree.
        rule (str): "path_min": min of the path's logits (= logit of the tree-min positive score
            of Def. 3.2.3, which the loss trains; a leaf can only win if all its ancestors score
            at least as high); "path_sum": sum of the path's logits (the ports' additive rule).

    Returns:
        Tensor: (B, C, ...); the argmax over C gives a leaf whose ancestors are the predictions
        of the coarser levels.
    """
    b, rest = node_logits.shape[0], node_logits.shape[2:]
    paths = tree.paths.to(node_logits.device)  # (L, C)
    gathered = node_logits.index_select(1, paths.reshape(-1))
    gathered = gathered.reshape(b, tree.num_levels, tree.num_leaves, *rest)
    if rule == "path_min":
        return gathered.amin(dim=1)
    if rule == "path_sum":
        return gathered.sum(dim=1)
    raise ValueError(f"MODEL.HSSN.INFERENCE must be 'path_min' or 'path_sum', got {rule!r}")


# ----------------------------------------------------------------------------- Mask2Former variant
# HSSN on the mask-classification template: every query scores the N tree nodes with sigmoids
# (instead of a softmax over K + 1 classes); the per-query terms below are the per-pixel ones of
# Eq. 4-6 with the query in the place of the pixel.


def tree_min_query_losses(
    node_logits: torch.Tensor,
    labels: torch.Tensor,
    tree: ClassTree,
    *,
    focal: bool = True,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Tree-min (Eq. 5) or focal tree-min (Eq. 6) loss of every query.

    A query with a leaf label y has the positives of a pixel of class y (y's root path) and
    negatives everywhere else, scored by the tree-constrained scores of Def. 3.2.3-3.2.4 (the
    T-constraints per query). A "no object" query (label -1) has no positive: every node is a
    negative, so its loss pushes all its node scores (each node's subtree maximum) to 0. Per
    query, each level's terms are divided by the level's node count and the levels summed, so the
    mean over queries equals :func:`tree_min_loss` over pixels with the same logits and labels.

    Args:
        node_logits (Tensor): (P, N) node logits of P queries.
        labels (Tensor): (P,) int64 leaf labels in [0, C), or -1 for "no object".
        tree (ClassTree): the tree.
        focal (bool): Eq. 6 instead of Eq. 5.
        gamma (float): focusing exponent of Eq. 6.

    Returns:
        Tensor: (P,) per-query losses (empty for P = 0).
    """
    if node_logits.dim() != 2 or node_logits.shape[1] != tree.num_nodes:
        raise ValueError(
            f"expected (P, {tree.num_nodes}) query node logits, got {tuple(node_logits.shape)}"
        )
    pos, neg = tree_min_logits(node_logits[:, :, None, None], tree)
    pos, neg = pos[:, :, 0, 0], neg[:, :, 0, 0]  # (P, N)
    no_object = labels < 0
    level_labels = tree.level_labels(labels, ignore_value=-1).clamp(min=0)  # (L, P)
    total = node_logits.new_zeros(node_logits.shape[0])
    for l in range(tree.num_levels):
        p, q = tree.level(pos, l), tree.level(neg, l)  # (P, n_l)
        neg_term, pos_term = _tree_min_terms(p, q, focal, gamma)
        y = level_labels[l].unsqueeze(1)  # (P, 1)
        positive = pos_term.gather(1, y).squeeze(1) - neg_term.gather(1, y).squeeze(1)
        per_query = neg_term.sum(1) + positive.masked_fill(no_object, 0.0)
        total = total + per_query / tree.level_sizes[l]
    return total


def tree_class_cost(tree: ClassTree) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Matching class cost of the Mask2Former variant: ``-sigmoid(path-min logit of c_j)``.

    The tree-min positive score (Def. 3.2.3) of the target's leaf, i.e. the smallest node
    probability on its root path, takes the place of MaskFormer's ``-p_i(c_j)`` (Sec. 3.2).

    Args:
        tree (ClassTree): the tree.

    Returns:
        callable: ``(node_logits (Q, N), labels (T,)) -> (Q, T)`` cost, for
        :class:`~seg_methods.modeling.matcher.HungarianMatcher`'s ``class_cost_fn``.
    """

    def cost(node_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        leaf = leaf_path_logits(node_logits, tree, "path_min")  # (Q, C)
        return -leaf.sigmoid()[:, labels.to(leaf.device)]

    return cost


def tree_semantic_inference(
    node_logits: torch.Tensor, mask_logits: torch.Tensor, tree: ClassTree, rule: str
) -> torch.Tensor:
    """Per-pixel leaf scores of the Mask2Former variant.

    Mask2Former's semantic inference with sigmoids: node score ``s_v(x) = sum_q sigmoid(z_qv)
    sigmoid(m_q(x))`` (no "no object" column to drop: a query that is no object has low scores
    on every node and contributes little), then the tree-respecting leaf score of
    :func:`leaf_path_logits` on those per-pixel node scores ("path_min": the smallest score on
    the leaf's root path; "path_sum": their sum).

    Args:
        node_logits (Tensor): (Q, N) node logits of one image.
        mask_logits (Tensor): (Q, H, W) mask logits.
        tree (ClassTree): the tree.
        rule (str): "path_min" or "path_sum".

    Returns:
        Tensor: (C, H, W) leaf scores (argmax = prediction; its ancestors are the coarser levels'
        predictions).
    """
    nodes = torch.einsum("qn,qhw->nhw", node_logits.sigmoid(), mask_logits.sigmoid())
    return leaf_path_logits(nodes.unsqueeze(0), tree, rule)[0]


def semantic_labels_from_masks(
    targets: List[Mapping[str, torch.Tensor]], size, ignore_value: int
) -> torch.Tensor:
    """Per-pixel leaf labels of a batch from the set criterion's targets.

    Args:
        targets (list[dict]): per image "labels" (T,) and "masks" (T, H, W), zero-padded to the
            padded input size (the mask-classification template's targets).
        size (tuple[int, int]): (H, W).
        ignore_value (int): label of pixels no mask covers (void and padding).

    Returns:
        Tensor: (B, H, W) int64.
    """
    out = []
    for t in targets:
        sem = torch.full(tuple(size), ignore_value, dtype=torch.int64, device=t["labels"].device)
        masks = t["masks"]
        for label, mask in zip(t["labels"].tolist(), masks):
            sem[: mask.shape[0], : mask.shape[1]][mask.bool()] = int(label)
        out.append(sem)
    return torch.stack(out)


class HSSNSetCriterion(SetCriterion):
    """The set criterion with HSSN's class terms on per-query node logits.

    Matching: the shared Hungarian matcher with :func:`tree_class_cost` as its class cost (same
    weights as Mask2Former's). Losses: "labels" is replaced by

    * "loss_tree_min": :func:`tree_min_query_losses` of every query (matched: the target leaf's
      path positive, the rest negative; unmatched: "no object", every node negative), averaged
      with weight 1 for matched and ``eos_coef`` (``MASK_CLS.NO_OBJECT_WEIGHT``) for unmatched
      queries, as the weighted cross-entropy it replaces;
    * "loss_level_ce" (optional): the ports' per-level softmax cross-entropy on the matched
      queries' node logits, mean over matched queries, summed over levels.

    "masks" (point-sampled BCE + dice of the matched pairs) and deep supervision are
    :class:`SetCriterion`'s.

    Args:
        tree (ClassTree): the tree (``pred_logits`` is (B, Q, N)).
        focal (bool), gamma (float): Eq. 6 (else Eq. 5) and its exponent.
        level_ce (bool): compute "loss_level_ce".
        **kwargs: :class:`SetCriterion` arguments (``num_classes`` = C leaves).
    """

    def __init__(
        self, *, tree: ClassTree, focal: bool = True, gamma: float = 2.0, level_ce: bool = False,
        **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.tree = tree
        self.focal, self.gamma, self.level_ce = focal, gamma, level_ce

    def loss_labels(
        self, outputs: Dict, targets: List[Dict], indices: List[Tuple], num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Tree-min loss of every query (+ per-level CE of the matched ones).

        Args:
            outputs (dict): needs "pred_logits" (B, Q, N) node logits.
            targets (list[dict]): need "labels" (T_b,) leaf labels.
            indices (list[tuple]): matcher output.
            num_masks (float): unused.

        Returns:
            dict: {"loss_tree_min": scalar} (+ "loss_level_ce"); defined (finite) for a batch
            without any target: every query is then "no object".
        """
        logits = outputs["pred_logits"].float()  # (B, Q, N)
        batch_idx, src_idx = self._src_permutation_idx(indices)
        matched = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(device=logits.device, dtype=torch.int64)
        labels = torch.full(logits.shape[:2], -1, dtype=torch.int64, device=logits.device)
        labels[batch_idx, src_idx] = matched
        flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
        per_query = tree_min_query_losses(
            flat_logits, flat_labels, self.tree, focal=self.focal, gamma=self.gamma
        )
        weight = torch.where(flat_labels >= 0, 1.0, self.eos_coef).to(per_query)
        losses = {"loss_tree_min": (weight * per_query).sum() / weight.sum().clamp(min=1e-6)}
        if self.level_ce:
            losses["loss_level_ce"] = self._level_ce(logits[batch_idx, src_idx], matched)
        return losses

    def _level_ce(self, node_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(M, N) matched node logits, (M,) leaves -> sum over levels of the mean softmax CE."""
        if labels.numel() == 0:
            return node_logits.sum() * 0.0
        level_labels = self.tree.level_labels(labels, ignore_value=-1)  # (L, M)
        return sum(
            F.cross_entropy(self.tree.level(node_logits, l), level_labels[l])
            for l in range(self.tree.num_levels)
        )


def build_hssn_set_criterion(cfg, tree: ClassTree, num_aux_outputs: int) -> HSSNSetCriterion:
    """:class:`HSSNSetCriterion` from ``cfg.MODEL.MASK_CLS.*`` and ``cfg.MODEL.HSSN.*``.

    Weights: "loss_tree_min" takes ``MASK_CLS.CLASS_WEIGHT`` (the term it replaces; also the
    weight of the tree class cost in the matcher), "loss_level_ce" ``HSSN.LEVEL_CE_WEIGHT`` (0:
    not computed), masks and dice as Mask2Former; every auxiliary output gets the same weights
    with ``MASK_CLS.DEEP_SUPERVISION``.

    Args:
        cfg (CfgNode): the config.
        tree (ClassTree): the tree.
        num_aux_outputs (int): auxiliary predictions of the decoder.

    Returns:
        HSSNSetCriterion
    """
    m, h = cfg.MODEL.MASK_CLS, cfg.MODEL.HSSN
    args = SetCriterion.from_config(cfg, tree.num_leaves, num_aux_outputs)
    args["matcher"] = HungarianMatcher(cfg, class_cost_fn=tree_class_cost(tree))
    base = {"loss_tree_min": m.CLASS_WEIGHT, "loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT}
    if h.LEVEL_CE_WEIGHT > 0:
        base["loss_level_ce"] = h.LEVEL_CE_WEIGHT
    args["weight_dict"] = expand_aux_weights(base, num_aux_outputs if m.DEEP_SUPERVISION else 0)
    return HSSNSetCriterion(
        tree=tree, focal=h.FOCAL, gamma=h.FOCAL_GAMMA, level_ce=h.LEVEL_CE_WEIGHT > 0, **args
    )
