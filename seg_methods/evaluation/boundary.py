"""Mask-refinement metrics: IoU and mean boundary accuracy (mBA), as CascadePSP defines them for
the BIG dataset (Cheng et al., CVPR 2020, Sec. 5) and CRM reports them (Shen et al., CVPR 2022,
Tables 1-5).

Definitions, for a binary ground truth G and a binary prediction P of size H x W:

* **IoU** = |G ∩ P| / |G ∪ P|. Over a dataset the intersections and unions are summed over the
  images first (pooled IoU), as the official evaluation scripts do; it is not the mean of the
  per-image IoUs.
* **Boundary band** at radius r: the morphological gradient (dilation minus erosion) of G with
  OpenCV's elliptic structuring element of size (2r + 1) x (2r + 1) (at r = 1 a 3 x 3 cross), i.e.
  the pixels within about r of the ground-truth boundary, on either side.
* **Boundary accuracy** BA_r = the fraction of band pixels where P equals G.
* **mBA** = the mean of BA_r over 5 radii r_i = 1 + int((r_max - 1) / 5 * i), i = 0..4, with
  r_max = (H + W) / 300 (so that the radii grow with the image: 1, 3, 6, 8, 11 at 2048 x 2048;
  only radius 1 below H + W = 600, ``int`` truncating towards zero). The dataset mBA is the mean
  of the per-image mBAs.

Masks are binarised before scoring: probabilities p > 128 / 255 count as foreground, which is the
official ``png > 128`` test on masks stored as 0..255 PNGs.

Defined results where the official code divides by zero (a ground truth without a boundary, i.e.
all background or all foreground, never happens in BIG): BA_r is then taken over the boundary band
of the *prediction* instead; if that is empty too (both masks constant), BA_r = 1 when P equals G
and 0 otherwise. A dataset whose unions are all empty has IoU 1.

Shape shorthand:
    H, W: image size.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from ..data.dataset_mappers.refinement import read_coarse_mask, read_gt_mask

from .rows import RowEvaluator

__all__ = [
    "MASK_THRESHOLD",
    "NUM_RADII",
    "RefinementEvaluator",
    "binarize",
    "boundary_accuracy",
    "boundary_band",
    "disk_kernel",
    "intersection_union",
    "mba_radii",
    "mean_boundary_accuracy",
]

logger = logging.getLogger(__name__)

# p > 128 / 255 is foreground: the official "png > 128" on masks stored as 0..255.
MASK_THRESHOLD = 128.0 / 255.0
NUM_RADII = 5


def binarize(mask, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Binary mask of a bool, probability or 0..255 mask.

    Args:
        mask (np.ndarray or Tensor): (H, W) bool (kept), uint8 0..255 (> 128 is foreground) or
            float probability in [0, 1] (> ``threshold`` is foreground).
        threshold (float): probability threshold of float masks.

    Returns:
        np.ndarray: (H, W) bool.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().to("cpu").numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8:
        return mask > 128
    return mask > threshold


def mba_radii(height: int, width: int, num_radii: int = NUM_RADII) -> List[int]:
    """The band radii of mBA: r_i = 1 + int((r_max - 1) / n * i), r_max = (H + W) / 300.

    Args:
        height (int): H.
        width (int): W.
        num_radii (int): n (5 in CascadePSP and CRM).

    Returns:
        list[int]: n radii, non-decreasing, each >= 1.
    """
    max_radius = (height + width) / 300.0
    # int() truncates towards zero: below H + W = 600 every radius is 1, as in the official code.
    return [1 + int((max_radius - 1.0) / num_radii * i) for i in range(num_radii)]


def disk_kernel(radius: int) -> np.ndarray:
    """OpenCV's elliptic structuring element of size (2r + 1) x (2r + 1) (r = 1: a 3 x 3 cross)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def boundary_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of the morphological gradient (dilation minus erosion) of a binary mask.

    Outside the image the dilation sees background and the erosion foreground (OpenCV's default
    border), so the image border is not a boundary.

    Args:
        mask (np.ndarray): (H, W) bool.
        radius (int): r of :func:`disk_kernel`.

    Returns:
        np.ndarray: (H, W) bool.
    """
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, disk_kernel(radius)) > 0


def _band_accuracy(gt: np.ndarray, pred: np.ndarray, band: np.ndarray) -> Optional[float]:
    n = int(band.sum())
    if n == 0:
        return None
    return float((gt[band] == pred[band]).sum()) / n


def boundary_accuracy(gt, pred, radius: int) -> float:
    """BA_r: accuracy of ``pred`` on the boundary band of radius r of ``gt``.

    Args:
        gt (np.ndarray): (H, W) ground truth (any form :func:`binarize` takes).
        pred (np.ndarray): (H, W) prediction (any form :func:`binarize` takes).
        radius (int): band radius r >= 1.

    Returns:
        float: in [0, 1]. A ground truth without a boundary uses the prediction's band, and
        two constant masks give 1.0 when equal, else 0.0 (see the module docstring).
    """
    gt, pred = binarize(gt), binarize(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    acc = _band_accuracy(gt, pred, boundary_band(gt, radius))
    if acc is None:
        acc = _band_accuracy(gt, pred, boundary_band(pred, radius))
    if acc is None:
        acc = float(np.array_equal(gt, pred))
    return acc


def mean_boundary_accuracy(gt, pred, radii: Optional[List[int]] = None) -> float:
    """mBA of one image: the mean of :func:`boundary_accuracy` over :func:`mba_radii`.

    Args:
        gt (np.ndarray): (H, W) ground truth.
        pred (np.ndarray): (H, W) prediction.
        radii (list[int] or None): override the radii (default ``mba_radii(H, W)``).

    Returns:
        float: in [0, 1].
    """
    gt, pred = binarize(gt), binarize(pred)
    radii = mba_radii(*gt.shape) if radii is None else list(radii)
    per_radius = {r: boundary_accuracy(gt, pred, r) for r in set(radii)}  # radii may repeat
    return float(np.mean([per_radius[r] for r in radii]))


def intersection_union(gt, pred) -> Tuple[int, int]:
    """Pixel counts |G ∩ P| and |G ∪ P| (summed over images for the pooled IoU).

    Args:
        gt (np.ndarray): (H, W) ground truth.
        pred (np.ndarray): (H, W) prediction.

    Returns:
        tuple[int, int]: (intersection, union).
    """
    gt, pred = binarize(gt), binarize(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    return int(np.count_nonzero(gt & pred)), int(np.count_nonzero(gt | pred))


def _pooled_iou(rows: List[Dict], prefix: str) -> float:
    inter = sum(r[prefix + "i"] for r in rows)
    union = sum(r[prefix + "u"] for r in rows)
    return 1.0 if union == 0 else inter / union


class RefinementEvaluator(RowEvaluator):
    """IoU and mBA of refined masks, and of the coarse masks they refine (CRM Table 1).

    Per image it reads:

    * the prediction: ``output["refined_mask"]`` (H, W) probability (CRM), else the foreground
      of ``output["sem_seg"]`` (2, H, W) (``sem_seg[1] > sem_seg[0]``; any binary segmenter);
    * the ground truth: ``input["gt_mask"]`` when it has the image's size (the refinement test
      mapper provides it at full resolution), else the PNG ``input["mask_file_name"]``;
    * the coarse input: ``input["coarse_mask"]`` (H, W) in [0, 1], else the PNG
      ``input["coarse_mask_file_name"]``. Images without one get no coarse numbers.

    Results (percent): ``{"refinement": {"IoU", "mBA", "coarse_IoU", "coarse_mBA",
    "delta_IoU", "delta_mBA", "num_images"}}``: IoU pooled over the images, mBA their mean.

    Args:
        dataset_name (str): the evaluated dataset (for messages).
        distributed (bool): gather the per-image rows of every process on rank 0 (the other
            ranks return ``{}``), so a multi-process evaluation scores the whole test set.
    """

    @staticmethod
    def _prediction(out: Dict, file_name: str) -> np.ndarray:
        if "refined_mask" in out:
            return binarize(out["refined_mask"].to(torch.float32))
        if "sem_seg" in out and out["sem_seg"].shape[0] == 2:
            sem = out["sem_seg"].detach().to("cpu")
            return (sem[1] > sem[0]).numpy()
        raise KeyError(
            f"RefinementEvaluator needs a 'refined_mask' (H, W) or a 2-channel 'sem_seg' output "
            f"for '{file_name}'; got {sorted(out)}."
        )

    @staticmethod
    def _ground_truth(x: Dict, size: Tuple[int, int]) -> np.ndarray:
        gt = x.get("gt_mask")
        if gt is not None and tuple(gt.shape) == size:
            return binarize(gt)
        if "mask_file_name" not in x:
            raise KeyError(
                f"RefinementEvaluator: the record of '{x.get('file_name')}' has no "
                "'mask_file_name' (binary ground-truth PNG) and no full-size 'gt_mask'."
            )
        return read_gt_mask(x["mask_file_name"]).astype(bool)

    @staticmethod
    def _coarse(x: Dict) -> Optional[np.ndarray]:
        if x.get("coarse_mask") is not None:
            return binarize(torch.as_tensor(x["coarse_mask"]).to(torch.float32))
        if "coarse_mask_file_name" in x:
            return binarize(read_coarse_mask(x["coarse_mask_file_name"]))
        return None

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            file_name = x.get("file_name", "<unknown>")
            pred = self._prediction(out, file_name)
            gt = self._ground_truth(x, pred.shape)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"RefinementEvaluator: the prediction for '{file_name}' is {pred.shape} (HxW) "
                    f"but its ground truth '{x.get('mask_file_name')}' is {gt.shape}."
                )
            i, u = intersection_union(gt, pred)
            row = {"i": i, "u": u, "mba": mean_boundary_accuracy(gt, pred)}
            coarse = self._coarse(x)
            if coarse is not None:
                if coarse.shape != gt.shape:
                    raise ValueError(
                        f"RefinementEvaluator: the coarse mask of '{file_name}' is {coarse.shape} "
                        f"(HxW) but its ground truth is {gt.shape}."
                    )
                ci, cu = intersection_union(gt, coarse)
                row.update(coarse_i=ci, coarse_u=cu, coarse_mba=mean_boundary_accuracy(gt, coarse))
            self._rows.append(row)

    def evaluate(self):
        rows = self._gathered_rows()
        if rows is None:  # another rank, or no predictions (warned)
            return {}
        res = OrderedDict()
        res["IoU"] = 100.0 * _pooled_iou(rows, "")
        res["mBA"] = 100.0 * float(np.mean([r["mba"] for r in rows]))
        with_coarse = [r for r in rows if "coarse_mba" in r]
        if with_coarse:
            if len(with_coarse) < len(rows):
                logger.warning(
                    f"RefinementEvaluator on {self.dataset_name}: {len(rows) - len(with_coarse)}"
                    f" of {len(rows)} images have no coarse mask; coarse_* use the others only."
                )
            res["coarse_IoU"] = 100.0 * _pooled_iou(with_coarse, "coarse_")
            res["coarse_mBA"] = 100.0 * float(np.mean([r["coarse_mba"] for r in with_coarse]))
            if len(with_coarse) == len(rows):
                res["delta_IoU"] = res["IoU"] - res["coarse_IoU"]
                res["delta_mBA"] = res["mBA"] - res["coarse_mBA"]
        res["num_images"] = len(rows)
        return OrderedDict(refinement=res)
