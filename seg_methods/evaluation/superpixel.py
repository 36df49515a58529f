"""Superpixel evaluation: achievable segmentation accuracy (ASA) and compactness (CO).

Definitions (Stutz, Hermans and Leibe, "Superpixels: an evaluation of the state-of-the-art",
CVIU 2018, Sec. 5.1), for a superpixel map S = {S_j} and a ground-truth segmentation G = {G_i} of
N pixels:

* ASA(G, S) = (1 / N) sum_j max_i |S_j ∩ G_i|: the accuracy of the best labelling of the image
  that is constant on every superpixel. Pixels whose ground truth is void (< 0) are left out
  (of N too).
* CO(S) = (1 / N) sum_j |S_j| Q(S_j), with the isoperimetric quotient Q(S_j) = 4 pi A(S_j) /
  P(S_j)^2, A the pixel count and P the perimeter: the number of 4-neighbour pixel edges between
  S_j and another superpixel or the image border (Stutz's implementation). A w x h rectangle has
  P = 2 (w + h); a square superpixel has Q = pi / 4.

ClustSeg (Sec. 4.4) reports both on BSDS500, where each image has several human segmentations:
ASA is averaged over them.

Shape shorthand:
    H, W: image size
"""

from collections import OrderedDict

import numpy as np

from ..data.datasets.superpixel import read_regions
from .rows import RowEvaluator

__all__ = ["achievable_segmentation_accuracy", "compactness", "SuperpixelEvaluator"]


def _relabel(x: np.ndarray) -> np.ndarray:
    return np.unique(x.ravel(), return_inverse=True)[1].reshape(x.shape)


def achievable_segmentation_accuracy(superpixels: np.ndarray, gt: np.ndarray) -> float:
    """ASA of a superpixel map w.r.t. one ground truth (void = negative ids, excluded).

    Args:
        superpixels (np.ndarray): (H, W) integer superpixel ids.
        gt (np.ndarray): (H, W) integer ground-truth segment ids.

    Returns:
        float: in [0, 1]; 1.0 when no pixel has a ground truth.
    """
    if superpixels.shape != gt.shape:
        raise ValueError(f"superpixel map {superpixels.shape} and ground truth {gt.shape} differ")
    valid = gt >= 0
    n = int(valid.sum())
    if n == 0:
        return 1.0
    sp = _relabel(superpixels[valid])
    g = _relabel(gt[valid])
    num_g = int(g.max()) + 1
    pairs = np.bincount(sp.astype(np.int64) * num_g + g, minlength=(int(sp.max()) + 1) * num_g)
    overlap = pairs.reshape(-1, num_g)  # (num superpixels, num gt segments)
    return float(overlap.max(axis=1).sum()) / n


def compactness(superpixels: np.ndarray) -> float:
    """CO of a superpixel map (Stutz et al. 2018; see the module docstring).

    Args:
        superpixels (np.ndarray): (H, W) integer superpixel ids.

    Returns:
        float: in (0, 1).
    """
    sp = _relabel(np.asarray(superpixels))
    h, w = sp.shape
    k = int(sp.max()) + 1
    area = np.bincount(sp.ravel(), minlength=k).astype(np.float64)
    perim = np.zeros(k, dtype=np.float64)
    # image border edges
    for border in (sp[0, :], sp[-1, :], sp[:, 0], sp[:, -1]):
        perim += np.bincount(border, minlength=k)
    # edges between 4-neighbours with different ids count for both sides
    for a, b in ((sp[:, 1:], sp[:, :-1]), (sp[1:, :], sp[:-1, :])):
        diff = a != b
        perim += np.bincount(a[diff], minlength=k)
        perim += np.bincount(b[diff], minlength=k)
    quotient = 4 * np.pi * area / perim**2
    return float((area * quotient).sum() / (h * w))


class SuperpixelEvaluator(RowEvaluator):
    """ASA and CO of the model's "superpixels" output against each record's regions file.

    Results: ``{"superpixel": {"ASA": %, "CO": %, "num_superpixels": mean count}}`` averaged over
    the images (ASA averaged over the ground truths of an image first).

    Args:
        dataset_name (str): the evaluated dataset (for messages).
        distributed (bool): gather the per-image rows of every process on rank 0 before
            averaging, so that a multi-process evaluation scores the whole test set (the other
            ranks return ``{}``).
    """

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            if "superpixels" not in out:
                raise KeyError(
                    "SuperpixelEvaluator needs a 'superpixels' output; the model must run the "
                    "superpixel task (MODEL.CLUSTSEG.TASK='superpixel')"
                )
            if "regions_file_name" not in x:
                raise KeyError(f"record of '{x.get('file_name')}' has no 'regions_file_name'")
            pred = out["superpixels"].to("cpu").numpy()
            gts = read_regions(x["regions_file_name"])
            asa = float(np.mean([achievable_segmentation_accuracy(pred, g) for g in gts]))
            self._rows.append(
                {
                    "ASA": asa,
                    "CO": compactness(pred),
                    "num_superpixels": float(len(np.unique(pred))),
                }
            )

    def evaluate(self):
        rows = self._gathered_rows()
        if rows is None:  # another rank, or no predictions (warned)
            return {}
        res = {
            "ASA": 100.0 * float(np.mean([r["ASA"] for r in rows])),
            "CO": 100.0 * float(np.mean([r["CO"] for r in rows])),
            "num_superpixels": float(np.mean([r["num_superpixels"] for r in rows])),
        }
        return OrderedDict(superpixel=res)
