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

Void pixels are excluded from every term (the ports overwrite void with class 0 in place; we do
not), and an all-void batch gives 0 (attached to the graph), never NaN.

Shape shorthand:
    B: batch, N: tree nodes, C: leaves (level-0 classes), L: levels, H, W: pixels, D: embedding.
"""

import math
from typing import List, Mapping, Optional

import torch
import torch.nn.functional as F

from ...data.target_generators.hierarchy import ClassHierarchyTargets, hierarchy_lookup
from ..meta_arch.per_pixel import per_pixel_cross_entropy

__all__ = [
    "ClassTree",
    "tree_min_logits",
    "tree_min_loss",
    "per_level_cross_entropy",
    "tree_distances",
    "tree_triplet_loss",
    "triplet_ramp",
    "leaf_path_logits",
]


class ClassTree:
    """The class tree of a ``class_hierarchy`` metadata entry, with the index tables HSSN needs.

    The level format (a parent index per node) cannot express a cycle or a node with two
    parents; the checks here are those left: consistent lengths, parent indices in range (both by
    :class:`ClassHierarchyTargets`), as many leaves as the model's classes, and no childless
    node above level 0.

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
        neg_term = -F.logsigmoid(-q)  # -log(1 - q)
        pos_term = -F.logsigmoid(p)  # -log p
        if focal:
            neg_term = neg_term * torch.sigmoid(q).pow(gamma)
            pos_term = pos_term * torch.sigmoid(-p).pow(gamma)  # (1 - p)^g
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

    Args:
        node_logits (Tensor): (B, N, H, W).
        tree (ClassTree): the tree.
        rule (str): "path_min": min of the path's logits (= logit of the tree-min positive score
            of Def. 3.2.3, which the loss trains; a leaf can only win if all its ancestors score
            at least as high); "path_sum": sum of the path's logits (the ports' additive rule).

    Returns:
        Tensor: (B, C, H, W); the argmax over C gives a leaf whose ancestors are the predictions
        of the coarser levels.
    """
    b, _, h, w = node_logits.shape
    paths = tree.paths.to(node_logits.device)  # (L, C)
    gathered = node_logits.index_select(1, paths.reshape(-1))
    gathered = gathered.reshape(b, tree.num_levels, tree.num_leaves, h, w)
    if rule == "path_min":
        return gathered.amin(dim=1)
    if rule == "path_sum":
        return gathered.sum(dim=1)
    raise ValueError(f"MODEL.HSSN.INFERENCE must be 'path_min' or 'path_sum', got {rule!r}")
