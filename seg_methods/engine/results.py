"""Evaluation results -> ``metrics.json`` and a printable table.

``metrics.json`` holds one flat level of tasks::

    {"panoptic_seg": {"PQ": 41.2, "SQ": 77.0, ...},
     "sem_seg": {"mIoU": 50.3, "IoU-person": 70.1, ...},
     "segm": {"AP": 30.2, "AP50": 51.0, ...}}

Keys are detectron2's evaluator result names (``panoptic_seg``, ``sem_seg``, ``segm``); with
several test datasets they become ``"<dataset>/<task>"``. Values are floats, ``null`` for
non-finite numbers (e.g. the IoU of a class absent from the split), so the file is strict JSON.
"""

import json
import math
import os
from typing import Dict, Mapping, Optional

from detectron2.utils.file_io import PathManager
from tabulate import tabulate

Metrics = Dict[str, Dict[str, Optional[float]]]


def _is_task_dict(d: Mapping) -> bool:
    """A task dict maps metric names to numbers (no nested dicts)."""
    return all(not isinstance(v, Mapping) for v in d.values())


def _to_float(v) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def flatten_metrics(results: Mapping) -> Metrics:
    """Normalise ``DefaultTrainer.test`` output to ``{task: {metric: value}}``.

    Args:
        results (Mapping): ``{task: {metric: value}}`` (one test dataset) or
            ``{dataset: {task: {metric: value}}}`` (several).

    Returns:
        dict: ``{task: {metric: float or None}}``; tasks of several datasets are prefixed by
        ``"<dataset>/"``.
    """
    flat: Metrics = {}
    for key, value in results.items():
        if not isinstance(value, Mapping):
            raise TypeError(f"results['{key}'] is {type(value).__name__}, expected a dict")
        if _is_task_dict(value):
            flat[key] = {m: _to_float(v) for m, v in value.items()}
        else:  # a dataset level
            for task, metrics in value.items():
                flat[f"{key}/{task}"] = {m: _to_float(v) for m, v in metrics.items()}
    return flat


def write_metrics_json(results: Mapping, path: str) -> Metrics:
    """Write :func:`flatten_metrics` of ``results`` to ``path`` (parents created).

    Returns:
        dict: what was written.
    """
    metrics = flatten_metrics(results)
    PathManager.mkdirs(os.path.dirname(path) or ".")
    with PathManager.open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def format_metrics_table(metrics: Metrics, *, per_class: bool = False) -> str:
    """A "task | metric | value" table.

    Args:
        metrics (dict): output of :func:`flatten_metrics`.
        per_class (bool): include per-class entries (names with a "-", e.g. "IoU-person").

    Returns:
        str: the table in markdown "pipe" format.
    """
    rows = []
    for task, values in metrics.items():
        for name, value in values.items():
            if per_class or "-" not in name:
                rows.append((task, name, "nan" if value is None else f"{value:.3f}"))
    return tabulate(
        rows, headers=["task", "metric", "value"], tablefmt="pipe", disable_numparse=True
    )
