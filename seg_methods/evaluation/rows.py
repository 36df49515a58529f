"""Per-image result rows gathered on the main process, shared by the row-based evaluators
(:class:`~seg_methods.evaluation.boundary.RefinementEvaluator`,
:class:`~seg_methods.evaluation.superpixel.SuperpixelEvaluator`)."""

import itertools
import logging
from typing import Dict, List, Optional

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["RowEvaluator", "gather_rows"]

logger = logging.getLogger(__name__)


def gather_rows(rows: List[dict], distributed: bool) -> Optional[List[dict]]:
    """Every rank's rows on the main process (None on the other ranks); ``rows`` itself when not
    distributed."""
    if not distributed:
        return rows
    comm.synchronize()
    rows = list(itertools.chain(*comm.gather(rows, dst=0)))
    return rows if comm.is_main_process() else None


class RowEvaluator(DatasetEvaluator):
    """An evaluator that keeps one result row (dict) per image in ``self._rows`` and reduces all
    of them on the main process in ``evaluate``.

    Args:
        dataset_name (str): the evaluated dataset (for messages).
        distributed (bool): gather the rows of every process on rank 0 (the other ranks return
            ``{}``), so a multi-process evaluation scores the whole test set.
    """

    def __init__(self, dataset_name: str, distributed: bool = True):
        self.dataset_name = dataset_name
        self._distributed = distributed
        self._rows: List[Dict] = []

    def reset(self):
        self._rows = []

    def _gathered_rows(self) -> Optional[List[Dict]]:
        """All processes' rows on the main process; None on the other ranks, and when there is
        no row at all (with a warning naming the dataset)."""
        rows = gather_rows(self._rows, self._distributed)
        if rows is None:  # not the main process
            return None
        if not rows:
            logger.warning(f"{type(self).__name__} on {self.dataset_name}: no predictions")
            return None
        return rows
