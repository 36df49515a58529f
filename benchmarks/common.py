"""Measurement helpers shared by the benchmarks (run them from the repository root).

Peak memory: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
made through c10's CPU allocator during the call (all tensor storage, temporaries and autograd
buffers) with the allocator's running total. The peak is the maximum of that total minus its
value before the first event, i.e. the peak extra tensor memory of the call on top of what
existed before it. Allocations outside the tensor allocator are not counted.
"""
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_bytes(fn):
    """Peak extra CPU tensor memory (bytes) allocated while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0
    events.sort()
    baseline = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - baseline


def timed(fn):
    """Wall time of one call of ``fn()`` in seconds."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns, repeats):
    """Run each of ``fns`` (name -> callable) ``repeats`` times, interleaved, so that machine
    load affects every side alike. Returns ({name: median seconds}, {name: [all seconds]})."""
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {name: statistics.median(v) for name, v in runs.items()}, runs


def parity_tool():
    """tools/compare_with_official_mask2former.py (the Mask2Former parity tool), as a module."""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import compare_with_official_mask2former

    return compare_with_official_mask2former


@contextlib.contextmanager
def official_with_random_weights(official_root, ours_cfg, seed):
    """The official Mask2Former built from ``ours_cfg`` (translated by the parity tool), loaded with
    the parity tool's random official-format weights of ``seed``.

    Yields:
        (OfficialCode, nn.Module, str): the official code, its model, and the path of the
        weights ``.pkl`` (for ``parity_tool().load_our_weights``; it exists inside the context).
    """
    parity = parity_tool()
    official = parity.OfficialCode(official_root)
    torch.manual_seed(seed)
    model = official.build_model(parity.official_cfg_from_ours(official, ours_cfg))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pkl")
        parity.save_official_pkl(parity.random_official_state(model, seed), weights, seed)
        parity.load_official_weights(model, weights)
        yield official, model, weights


def write_report(path, extra):
    """Write ``extra`` plus machine/command information as JSON to ``path``."""
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }
    report.update(extra)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
