"""Per-image result rows gathered on the main process, shared by the row-based evaluators."""

import itertools
from typing import List, Optional

from detectron2.utils import comm

__all__ = ["gather_rows"]


def gather_rows(rows: List[dict], distributed: bool) -> Optional[List[dict]]:
    """Every rank's rows on the main process (None on the other ranks); ``rows`` itself when not
    distributed."""
    if not distributed:
        return rows
    comm.synchronize()
    rows = list(itertools.chain(*comm.gather(rows, dst=0)))
    return rows if comm.is_main_process() else None
