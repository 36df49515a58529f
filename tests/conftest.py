"""Shared pytest setup: deterministic seeds, two CPU threads, a small embedded dataset."""

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _module_threads(request):
    """A module that sets ``TORCH_THREADS = n`` runs with n intra-op threads (restored after it):
    on the shared 2-core machine two OpenMP threads competing with other processes made small
    models several times slower."""
    n = getattr(request.module, "TORCH_THREADS", None)
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A tiny synthetic dataset (8 train / 4 val images of 64x64), generated once per session.

    Registers ``tiny_synthetic_{panoptic,sem_seg,instance}_{train,val}`` (same classes and
    metadata as the default ``synthetic_*`` datasets) and returns a dict with the keys
    ``root, panoptic_train, panoptic_val, sem_seg_train, sem_seg_val, instance_train,
    instance_val`` (the folder and the registered names).
    """
    from seg_methods.data.datasets.synthetic import register_synthetic

    root = tmp_path_factory.mktemp("tiny_synthetic") / "synthetic"
    return register_synthetic(
        "tiny_synthetic",
        root=str(root),
        num_train=8,
        num_val=4,
        image_size=64,
        seed=0,
        generate=True,
        num_workers=1,
    )
