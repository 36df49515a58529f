"""Two gloo processes on the CPU, through ``seg_methods.engine.launch`` (train_net's launcher).

Each process runs the real :class:`~seg_methods.engine.Trainer` (DefaultTrainer's DDP wrapping,
solver, hooks, checkpointer) for a few SGD steps of a tiny segmentor on the embedded synthetic
dataset (32x32 images). The data order is made identical between the runs by feeding fixed
batches instead of detectron2's random training sampler, whose shuffling depends on the number of
processes: at step t the global batch is the 4 mapped training images rotated by t; rank r of 2
takes global images ``[2r, 2r + 2)``, the one-process run takes all 4 (same total batch).

Checked for three normalisations of the first convolution (the rest is GroupNorm):

* "FrozenBN" and "SyncBN": parameters (and SyncBN's running statistics) are identical on the
  two ranks and equal those of the one-process run within float tolerance. SyncBN layers are
  converted to :class:`~seg_methods.engine.CPUSyncBatchNorm` (torch's SyncBatchNorm needs a GPU),
  whose global batch statistics are those of the one-process batch.
* "BN": parameters are identical across ranks, but each process normalises with the statistics of
  its own 2 images, so the result differs from the one-process run, as with BN on GPUs. This also
  shows that the comparison above can fail. The running statistics, which differ between the
  ranks, are rank 0's on every rank after the evaluation that ends training: ``Trainer.test``
  calls ``broadcast_buffers`` first.

The loss is a mean over images of per-image means, so that DDP's gradient averaging over ranks
equals the gradient of the one-process batch mean. The landed meta-architectures are not used for
this comparison: the shared set criterion's point-sampled mask losses draw random points for each
batch, which differ between a one-process and a two-process run, and their configs use per-process
BN (all three were trained with ``train_net.py --num-gpus 2`` by hand). The spawned processes
import this module by name, as pytest's default import mode leaves it on ``sys.path``.
"""

import itertools
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_launch import launch_retrying_gloo_aborts
from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper
from seg_methods.data.datasets.synthetic import register_synthetic
from seg_methods.engine import (
    CPUSyncBatchNorm,
    Trainer,
    broadcast_buffers,
    convert_sync_batchnorm_for_cpu,
    cpu_capable_ddp,
    create_ddp_model,
    launch,
)
from seg_methods.engine.launch import threads_per_process

WORLD = 2
PER_RANK = 2
STEPS = 3
NORMS = ("FrozenBN", "SyncBN", "BN")
# the tiny synthetic dataset; each spawned process registers the same (already generated) folder
DATA = dict(name_prefix="dist_synthetic", num_train=PER_RANK * WORLD, num_val=2, image_size=32)
# collectives of a stuck rank raise after this instead of hanging the test
TIMEOUT = timedelta(seconds=120)
IGNORE = 255


class DistTestSegmentor(nn.Module):
    """conv3x3 + norm (MODEL.RESNETS.NORM) -> ReLU -> conv3x3 + GN -> ReLU -> 1x1 classifier.

    Training loss: per-image cross-entropy (mean over the image's labelled pixels), averaged over
    the images of the batch.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        norm1 = get_norm(cfg.MODEL.RESNETS.NORM, 8)
        self.conv1 = Conv2d(3, 8, 3, padding=1, bias=False, norm=norm1)
        self.conv2 = Conv2d(8, 8, 3, padding=1, bias=False, norm=nn.GroupNorm(2, 8))
        self.predictor = nn.Conv2d(8, self.num_classes, 1)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        x = torch.stack([(b["image"].float() - self.mean) / self.std for b in batched_inputs])
        logits = self.predictor(F.relu(self.conv2(F.relu(self.conv1(x)))))
        if not self.training:
            return [{"sem_seg": lg} for lg in logits]
        losses = [
            F.cross_entropy(lg[None], b["sem_seg"][None].long(), ignore_index=IGNORE)
            for lg, b in zip(logits, batched_inputs)
        ]
        return {"loss_ce": torch.stack(losses).mean()}


if "DistTestSegmentor" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(DistTestSegmentor)


class FixedBatchTrainer(Trainer):
    """``Trainer`` whose training batches are fixed (see the module docstring)."""

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = build_dataset_mapper(cfg, is_train=True)
        images = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])]
        rank, world = comm.get_rank(), comm.get_world_size()
        per_rank = cfg.SOLVER.IMS_PER_BATCH // world
        batches = []
        for t in range(STEPS):
            global_batch = images[t:] + images[:t]
            batches.append(global_batch[rank * per_rank : (rank + 1) * per_rank])
        return itertools.cycle(batches)


def _register(root):
    return register_synthetic(root=root, seed=0, **DATA)


def _cfg(root, norm, out_dir, world):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DistTestSegmentor"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 8
    cfg.DATASETS.TRAIN = (_register(root)["panoptic_train"],)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    cfg.INPUT.MIN_SIZE_TRAIN = (DATA["image_size"],)  # deterministic mapper: no resize/crop/flip
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * DATA["image_size"]
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.SOLVER.IMS_PER_BATCH = PER_RANK * WORLD  # the same total batch in every run
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.MAX_ITER = STEPS
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.NUM_VIS_IMAGES = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = os.path.join(out_dir, f"{norm}_world{world}")
    cfg.freeze()
    return cfg


def _train(cfg):
    """Train with ``FixedBatchTrainer``; returns (state dict, the trained module)."""
    torch.manual_seed(0)  # same initial weights in every run (DDP also broadcasts rank 0's)
    trainer = FixedBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    if comm.get_world_size() > 1:
        assert isinstance(model, DistributedDataParallel)
        model = model.module
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def _check_sync_batchnorm_on_3d_input():
    """CPUSyncBatchNorm on (N, C, L) halves of a batch == BatchNorm1d on the whole batch."""
    rank, world = comm.get_rank(), comm.get_world_size()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * world, 3, 5, generator=gen)
    upstream = torch.randn(2 * world, 3, 5, generator=gen)
    mine = slice(2 * rank, 2 * rank + 2)

    ref = nn.BatchNorm1d(3)
    sync = CPUSyncBatchNorm(3)
    sync.load_state_dict(ref.state_dict())
    x_ref = x.clone().requires_grad_()
    (ref(x_ref) * upstream).sum().backward()
    x_mine = x[mine].clone().requires_grad_()
    out = sync(x_mine)
    (out * upstream[mine]).sum().backward()

    with torch.no_grad():
        expected = F.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)[mine]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sync.running_mean, ref.running_mean)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    weight_grad = sync.weight.grad.clone()
    torch.distributed.all_reduce(weight_grad)  # each rank holds its share of the gradient
    torch.testing.assert_close(weight_grad, ref.weight.grad, rtol=1e-4, atol=1e-5)


def _train_worker(root, out_dir):
    """Runs in each spawned process: one training per norm; saves the state dicts."""
    _check_sync_batchnorm_on_3d_input()
    for norm in NORMS:
        state, model = _train(_cfg(root, norm, out_dir, comm.get_world_size()))
        if norm == "SyncBN":  # converted for the CPU; the state dict keys are unchanged
            assert type(model.conv1.norm) is CPUSyncBatchNorm
        synced = None
        if norm == "BN":  # make the running statistics differ, then give every rank rank 0's
            model.conv1.norm.running_mean.add_(comm.get_rank())
            assert broadcast_buffers(model) == len(list(model.buffers()))
            synced = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(
            {"state": state, "synced": synced, "threads": torch.get_num_threads()},
            os.path.join(out_dir, f"{norm}_rank{comm.get_rank()}.pt"),
        )


@pytest.fixture(scope="module")
def dist_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist") / "synthetic")
    register_synthetic(root=root, seed=0, generate=True, num_workers=1, **DATA)
    return root


def _assert_close(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(
                a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} {k}: {m}"
            )
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


def test_two_processes_match_one_process(dist_root, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # let launch place the threads
    out = str(tmp_path)
    launch_retrying_gloo_aborts(_train_worker, WORLD, (dist_root, out), TIMEOUT)

    for norm in NORMS:
        ranks = [torch.load(os.path.join(out, f"{norm}_rank{r}.pt")) for r in range(WORLD)]
        cores = len(os.sched_getaffinity(0))
        assert all(r["threads"] == max(1, cores // WORLD) for r in ranks)
        # (a) DDP: the same parameters on every rank, bit for bit
        model = DistTestSegmentor(_cfg(dist_root, norm, out, 1))
        for name, _ in model.named_parameters():
            assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), (norm, name)

        # (b) one process with the same total batch (4 images per step); with SyncBN this also
        # compares the running statistics (global ones vs those of the one-process batch)
        torch.manual_seed(0)
        initial = DistTestSegmentor(_cfg(dist_root, norm, out, 1)).state_dict()
        single, _ = _train(_cfg(dist_root, norm, out, 1))
        assert not torch.allclose(single["predictor.weight"], initial["predictor.weight"])
        if norm == "BN":
            # each rank has its own running statistics, but the evaluation at the end of training
            # (Trainer.test, here on no dataset) gave every rank rank 0's
            for k in ("running_mean", "running_var"):
                key = f"conv1.norm.{k}"
                assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
            for r in ranks:
                _assert_close(r["synced"], ranks[0]["state"], "BN after broadcast_buffers")
            # per-process batch statistics: the weights are not the one-process ones
            diff = (single["conv1.weight"] - ranks[0]["state"]["conv1.weight"]).abs().max()
            assert diff > 1e-4, diff
        else:
            _assert_close(ranks[0]["state"], single, f"{norm}: 2 processes vs 1")


def test_cpu_sync_batchnorm_without_process_group_is_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    sync = CPUSyncBatchNorm(4)
    sync.load_state_dict(bn.state_dict())
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_convert_sync_batchnorm_keeps_parameters_and_state():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Sequential(nn.SyncBatchNorm(4))
    )
    model[1].running_mean.fill_(0.5)
    weight = model[1].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_sync_batchnorm_for_cpu(model) == 2
    assert type(model[1]) is CPUSyncBatchNorm and type(model[2][0]) is CPUSyncBatchNorm
    assert model[1].weight is weight  # the optimizer still updates the converted layers
    assert any(p is weight for p in optimizer.param_groups[0]["params"])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_launch_checks_its_arguments(monkeypatch):
    never = lambda: pytest.fail("must not run")  # noqa: E731
    with pytest.raises(ValueError, match="--dist-url tcp://HOST:PORT"):
        launch(never, 2, num_machines=2, machine_rank=0, dist_url="auto")
    with pytest.raises(ValueError, match="--machine-rank"):
        launch(never, 2, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="--num-gpus"):
        launch(never, 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(2) is None  # the user's choice is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_process(2) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_one_process_runs_in_place_and_wraps_nothing():
    import detectron2.engine.defaults as d2_defaults

    calls = []
    launch(calls.append, 1, args=("ran",))
    assert calls == ["ran"]
    model = nn.Linear(2, 2)
    assert create_ddp_model(model) is model  # world size 1
    original = d2_defaults.create_ddp_model
    with cpu_capable_ddp():
        assert d2_defaults.create_ddp_model is create_ddp_model
    assert d2_defaults.create_ddp_model is original
