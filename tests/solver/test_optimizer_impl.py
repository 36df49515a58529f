"""SPEED.OPTIMIZER_IMPL: foreach / fused AdamW and SGD give the for-loop's update."""

import pytest
import torch
from torch import nn

from seg_methods.config import get_cfg
from seg_methods.solver import OPTIMIZER_IMPLS, build_optimizer


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        # (no conv bias before the BatchNorm: its gradient is ~0 and Adam would amplify rounding)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)
        self.query_embed = nn.Embedding(4, 8)

    def forward(self, x):
        f = self.backbone(x).mean((2, 3))
        return (self.head(f + self.query_embed.weight.sum(0)) ** 2).mean()


def _cfg(impl, optimizer="ADAMW", clip=True):
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = optimizer
    cfg.SOLVER.BASE_LR = 1e-2
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = clip
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    cfg.SPEED.OPTIMIZER_IMPL = impl
    return cfg


def _train(impl, optimizer="ADAMW", steps=4):
    torch.manual_seed(0)
    model = _Model()
    opt = build_optimizer(_cfg(impl, optimizer), model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(2, 3, 6, 6, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_foreach_and_fused_match_the_for_loop(optimizer):
    _, reference = _train("for-loop", optimizer)
    _, default = _train("default", optimizer)
    for n in reference:  # PyTorch's default on the CPU is the for-loop: identical
        assert torch.equal(default[n], reference[n]), n
    for impl in ("foreach", "fused"):
        opt, params = _train(impl, optimizer)
        assert opt.defaults[impl] is True
        for n in reference:
            torch.testing.assert_close(params[n], reference[n], rtol=1e-5, atol=1e-6, msg=n)
        moved = sum(float((params[n] - reference[n]).abs().max()) for n in reference)
        assert moved < 1e-4


def test_config_default_is_fused_and_unknown_impl_is_named():
    assert get_cfg().SPEED.OPTIMIZER_IMPL == "fused"
    opt = build_optimizer(get_cfg(), _Model())
    assert opt.defaults["fused"] is True
    opt, _ = _train("default", steps=0)
    assert opt.defaults["foreach"] is None and not opt.defaults.get("fused")
    assert set(OPTIMIZER_IMPLS) == {"default", "for-loop", "foreach", "fused"}
    with pytest.raises(KeyError, match="SPEED.OPTIMIZER_IMPL"):
        build_optimizer(_cfg("apex"), _Model())
