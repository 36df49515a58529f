"""Per-level mIoU of hierarchical semantic segmentation: mIoU^1..mIoU^L (HSSN, Tables 2, 5, 6).

mIoU^1 is the finest level (the dataset's classes), mIoU^l the level l - 1 of the metadata's
``class_hierarchy`` (level 0 = classes), as in the paper (Cityscapes: mIoU^1 over the 19
classes, mIoU^2 over the 7 categories). Leaf predictions ("sem_seg" (C, H, W), argmax) and the
ground truth are mapped up the tree; since that map is a function of the leaf, the level-l
confusion matrix is the leaf confusion matrix summed over the leaves of each (prediction,
ground-truth) pair of level-l nodes, so one leaf confusion matrix per dataset is all that is
accumulated. Void ground-truth pixels are excluded at every level.

Selected by ``build_evaluator`` for every dataset whose metadata has ``class_hierarchy`` when the
model outputs semantic segmentation (``TEST.SEMANTIC_ON``), whatever the model, so that flat
baselines get the same per-level numbers as HSSN.
"""

from collections import OrderedDict
from typing import Dict, List

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.comm import all_gather, is_main_process, synchronize

from ..data.target_generators.hierarchy import hierarchy_lookup

__all__ = ["HierarchicalSemSegEvaluator", "level_confusion", "mean_iou", "per_level_miou"]


def level_confusion(leaf_conf: np.ndarray, ancestors: np.ndarray, num_nodes: int) -> np.ndarray:
    """Confusion matrix of one level from the leaf confusion matrix.

    Args:
        leaf_conf (ndarray): (C, C) int64, [prediction, ground truth] counts over valid pixels.
        ancestors (ndarray): (C,) the level's node of every leaf.
        num_nodes (int): K, nodes of the level.

    Returns:
        ndarray: (K, K) int64, [prediction, ground truth].
    """
    onehot = np.zeros((leaf_conf.shape[0], num_nodes), dtype=np.int64)  # (C, K)
    onehot[np.arange(leaf_conf.shape[0]), ancestors] = 1
    return onehot.T @ leaf_conf @ onehot


def mean_iou(conf: np.ndarray) -> float:
    """mIoU (%) over the classes present in the ground truth (as detectron2's SemSegEvaluator) (NaN if none).

    Args:
        conf (ndarray): (K, K) [prediction, ground truth] counts.
    """
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(0) > 0  # as detectron2's SemSegEvaluator: classes with ground truth
    if not present.any():
        return float("nan")
    return float(100.0 * np.mean(tp[present] / union[present]))


def per_level_miou(
    pred: np.ndarray, gt: np.ndarray, parents: List[List[int]], ignore_label: int
) -> List[float]:
    """mIoU^1..mIoU^L of leaf predictions against leaf ground truth (pure function).

    Args:
        pred (ndarray): (...) int leaf predictions.
        gt (ndarray): (...) int leaf ground truth, ``ignore_label`` on void.
        parents (list[list[int]]): ``class_hierarchy["parents"]``.
        ignore_label (int): void label.

    Returns:
        list[float]: L values, finest level first.
    """
    num_classes = len(parents[0]) if parents else int(max(pred.max(), gt.max())) + 1
    conf = leaf_confusion(pred, gt, num_classes, ignore_label)
    ancestors = hierarchy_lookup(parents, num_classes).numpy()
    sizes = [num_classes] + [max(p) + 1 for p in parents]
    return [mean_iou(level_confusion(conf, ancestors[l], k)) for l, k in enumerate(sizes)]


def leaf_confusion(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: int
) -> np.ndarray:
    """(C, C) [prediction, ground truth] counts over the non-void pixels."""
    valid = gt != ignore_label
    index = num_classes * pred[valid].astype(np.int64) + gt[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class HierarchicalSemSegEvaluator(SemSegEvaluator):
    """mIoU^1..mIoU^L (results key "hier_sem_seg") from "sem_seg" leaf predictions.

    Reuses detectron2's :class:`SemSegEvaluator` for the ground-truth files, the metadata
    (``stuff_classes``, ``ignore_label``) and the distributed gathering convention, and adds the
    dataset's ``class_hierarchy``.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir=None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        hierarchy = MetadataCatalog.get(dataset_name).get("class_hierarchy", None)
        if hierarchy is None:
            raise KeyError(f"dataset '{dataset_name}' has no metadata 'class_hierarchy'")
        self._parents = [list(p) for p in hierarchy["parents"]]
        self._level_names = [list(n) for n in hierarchy["names"]]
        if len(self._level_names[0]) != self._num_classes:
            raise ValueError(
                f"'{dataset_name}': class_hierarchy has {len(self._level_names[0])} level-0 "
                f"classes but stuff_classes has {self._num_classes}"
            )
        self._ancestors = hierarchy_lookup(self._parents, self._num_classes).numpy()

    def reset(self):
        self._leaf_conf = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            pred = out["sem_seg"].argmax(dim=0).cpu().numpy()
            gt_file = self.input_file_to_gt_file[x["file_name"]]
            gt = self.sem_seg_loading_fn(gt_file, dtype=int)
            self._leaf_conf += leaf_confusion(pred, gt, self._num_classes, self._ignore_label)

    def evaluate(self) -> Dict:
        conf = self._leaf_conf
        if self._distributed:
            synchronize()
            gathered = all_gather(conf)
            if not is_main_process():
                return None
            conf = sum(gathered)
        res = OrderedDict()
        for l, names in enumerate(self._level_names):
            res[f"mIoU^{l + 1}"] = mean_iou(level_confusion(conf, self._ancestors[l], len(names)))
        return OrderedDict(hier_sem_seg=res)
