"""Model outputs painted from ground-truth segments, for the oracle models of the engine and
distributed-evaluation tests (importable from every test file, as ``repo_scripts``)."""

from typing import Dict, List, Sequence

import torch
from detectron2.structures import Instances


def outputs_from_segments(
    pan: torch.Tensor,
    segments: Sequence[Dict],
    num_classes: int,
    *,
    decreasing_scores: bool,
    device=None,
) -> Dict:
    """The three outputs of a model that predicts exactly ``segments``.

    Args:
        pan (Tensor): (H, W) int64 segment ids.
        segments (list[dict]): "id" (in ``pan``), "category_id", "isthing", in output order.
        num_classes (int): channels of "sem_seg".
        decreasing_scores (bool): instance scores from 1 down to 0.5 in ``segments`` order
            (a single instance scores 1), else all 1.
        device: of "sem_seg" (default CPU).

    Returns:
        dict: "sem_seg" (C, H, W) one-hot, "panoptic_seg" (ids 1.. in ``segments`` order,
        segments_info), "instances" (the thing segments as masks).
    """
    h, w = pan.shape
    sem = torch.zeros(num_classes, h, w, device=device)
    seg_out = torch.zeros(h, w, dtype=torch.int32)
    segments_info: List[Dict] = []
    masks, classes = [], []
    for new_id, s in enumerate(segments, start=1):
        m = pan == s["id"]
        sem[s["category_id"]][m] = 1.0
        seg_out[m] = new_id
        info = {"id": new_id, "category_id": s["category_id"], "isthing": s["isthing"]}
        segments_info.append(info)
        if s["isthing"]:
            masks.append(m.float())
            classes.append(s["category_id"])
    inst = Instances((h, w))
    inst.pred_masks = torch.stack(masks) if masks else torch.zeros(0, h, w)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    n = len(classes)
    inst.scores = torch.linspace(1.0, 0.5, n) if decreasing_scores else torch.ones(n)
    return {"sem_seg": sem, "panoptic_seg": (seg_out, segments_info), "instances": inst}
