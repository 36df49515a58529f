#!/usr/bin/env python
"""Numerical parity check: our ProtoSeg on timm HRNet-W48 vs the official ``HRNet_W48_Proto``.

Proves the checkpoint mapping of ``tools/convert_protoseg_weights.py`` end to end:

1. the official model (tfzhou/ProtoSeg ``lib/models/nets/hrnet.py::HRNet_W48_Proto`` with its
   ``hrnet48`` backbone, imported at run time from ``--official-root``; no file is copied) is
   built on the CPU and given random weights (every floating-point tensor, BN statistics and
   prototypes included; :func:`randomize_official_state`);
2. its state dict is saved in the official trainer's format (``{"config_dict", "state_dict"}``
   with DDP's ``module.`` prefix);
3. that file is converted with ``tools/convert_protoseg_weights.py`` (the CLI path, with the key /
   shape check against our config) and loaded into our model with ``SegCheckpointer`` (strict);
4. both run in eval mode on the same normalised random batch; the report compares the four
   HRNet branches, the class logits at 1/4 (the official ``out_seg``), their argmax and each
   pixel's nearest prototype (``c * M + m``), as max |ours - official| and relative to
   max |official|. One extra row runs ours with the projection L2 over the channels (our default,
   ``MODEL.PROTOSEG.PROJECTION_L2_AXIS "channels"``) to show what the official axis changes.

Usage::

    # the official source: a checkout, or from the fetch mirror:
    #   git -C /work/.mirror/tfzhou+ProtoSeg/repo archive HEAD lib | tar -x -C /tmp/protoseg_official
    python tools/compare_with_official_protoseg.py --official-root /tmp/protoseg_official

How the official code is run (nothing in its files is modified):

- ``einops`` (imported by the official model file) is used when installed; otherwise a minimal
  stand-in module providing only the ``rearrange`` / ``repeat`` patterns ``HRNet_W48_Proto``
  uses is put in ``sys.modules`` (any other pattern raises).
- The official ``Configer`` is replaced by a small dict-backed object answering the keys the
  model and backbone read (``network.backbone`` "hrnet48", ``network.bn_type`` "torchsyncbn",
  ``network.pretrained`` None so no ImageNet file is read, the ``protoseg`` values of
  ``configs/cityscapes/H_48_D_4_proto.json``).
- The environment switches the official HRNet reads (``full_res_stem``, ``drop_stage4``,
  ``keep_imagenet_head``) are removed while it runs.
- ``torch.nn.SyncBatchNorm`` (the official ``torchsyncbn``) runs its plain batch-norm path in eval
  mode on the CPU; nothing CUDA-only is called in the eval forward.

Tolerance: max |diff| <= ``--rtol`` (default 1e-4) x max |official| for the logits and
branches, and identical argmax / nearest-prototype maps except where the official top-2 gap is
within ``--margin`` (ties at float32 rounding).
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.utils.parity import Report, Row, randomize_state  # noqa: E402  (shared)
from seg_methods.modeling.backbone.timm_backbone import set_upsample_mode  # noqa: E402
from seg_methods.utils.checkpoint import SegCheckpointer  # noqa: E402

DEFAULT_CONFIG = os.path.join(
    REPO,
    "configs/cityscapes/semantic-segmentation/protoseg/"
    "protoseg_hrnet_w48_bs8_80k_official_weights.yaml",
)
_ENV_SWITCHES = ("full_res_stem", "drop_stage4", "keep_imagenet_head")


# --------------------------------------------------------------------------- official side
class _Configer:
    """Dict-backed stand-in of the official ``Configer`` (``get`` / ``exists`` by key path)."""

    def __init__(self, values: Dict):
        self.values = values

    def get(self, *keys):
        node = self.values
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise KeyError(f"official code asked for config key {keys}, not provided")
            node = node[k]
        return node

    def exists(self, *keys) -> bool:
        try:
            self.get(*keys)
        except KeyError:
            return False
        return True


def _einops_standin() -> types.ModuleType:
    """The ``rearrange`` / ``repeat`` patterns of ``HRNet_W48_Proto``, nothing else."""
    mod = types.ModuleType("einops")

    def rearrange(x, pattern, **sizes):
        if pattern == "b c h w -> (b h w) c":
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        if pattern == "(b h w) k -> b k h w":
            b, h = sizes["b"], sizes["h"]
            return x.reshape(b, h, -1, x.shape[-1]).permute(0, 3, 1, 2)
        raise NotImplementedError(f"einops stand-in: rearrange pattern {pattern!r}")

    def repeat(x, pattern, **sizes):
        if pattern == "n -> n tile":
            return x[:, None].expand(-1, sizes["tile"])
        raise NotImplementedError(f"einops stand-in: repeat pattern {pattern!r}")

    mod.rearrange, mod.repeat = rearrange, repeat
    return mod


@contextlib.contextmanager
def official_import_context(root: str):
    """``sys.path`` + einops stand-in (if needed) + cleared HRNet env switches."""
    saved_env = {k: os.environ.pop(k) for k in _ENV_SWITCHES if k in os.environ}
    added_einops = False
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = _einops_standin()
        added_einops = True
    sys.path.insert(0, root)
    try:
        yield added_einops
    finally:
        sys.path.remove(root)
        if added_einops:
            sys.modules.pop("einops", None)
        os.environ.update(saved_env)


def find_official_model_file(root: str) -> str:
    path = os.path.join(root, "lib", "models", "nets", "hrnet.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--official-root {root!r} has no lib/models/nets/hrnet.py (a tfzhou/ProtoSeg checkout "
            "or `git archive HEAD lib` of it is expected)"
        )
    return path


def build_official(root: str, num_classes: int, num_prototypes: int):
    """Build ``HRNet_W48_Proto`` (eval mode, CPU) from the official source at ``root``."""
    find_official_model_file(root)
    configer = _Configer(
        {
            "data": {"num_classes": num_classes},
            "network": {
                "backbone": "hrnet48",
                "bn_type": "torchsyncbn",
                "pretrained": None,
                "resume": None,
            },
            "protoseg": {
                "gamma": 0.999,
                "num_prototype": num_prototypes,
                "use_prototype": True,
                "update_prototype": True,
                "pretrain_prototype": False,
            },
        }
    )
    with official_import_context(root) as standin:
        from lib.models.nets.hrnet import HRNet_W48_Proto  # noqa: E402  (official, run time)

        model = HRNet_W48_Proto(configer)
    return model.eval(), standin


def randomize_official_state(model: torch.nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """Random values for every floating-point tensor of the official state dict
    (:func:`~seg_methods.utils.parity.randomize_state`: convolutions keep their PyTorch default
    initialisation plus 10% noise; BN / LayerNorm weights U(0.5, 1.5), biases and running means
    N(0, 0.1), running variances U(0.5, 2)); prototypes N(0, 1) (the official forward
    L2-normalises them)."""

    def prototypes(key, value, g):
        return torch.randn(value.shape, generator=g) if key == "prototypes" else None

    return randomize_state(model, seed, special=prototypes)


# --------------------------------------------------------------------------- our side
def build_ours(config_file: str, opts=()) -> torch.nn.Module:
    cfg = get_cfg()
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.PRETRAINED = False
    cfg.MODEL.TIMM.NORM = ""  # plain BN on one CPU process (same keys as SyncBN)
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg).eval(), cfg


# --------------------------------------------------------------------------- comparison
def _max(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _map_row(name, ours_map, off_map, off_scores, margin) -> Row:
    """Compare two index maps; disagreements are allowed only at official near-ties."""
    top2 = off_scores.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]  # (B, h, w)
    differ = ours_map != off_map
    bad = differ & (gap > margin)
    note = f"{int(differ.sum())} of {differ.numel()} pixels differ, {int(bad.sum())} not at ties"
    return Row(name, float(differ.float().mean()), 1.0, not bool(bad.any()), note)


def compare(
    official_root: str,
    config_file: str = DEFAULT_CONFIG,
    *,
    opts=(),
    size=(64, 128),
    batch: int = 2,
    seed: int = 0,
    rtol: float = 1e-4,
    margin: float = 1e-4,
    info_rows: bool = True,
    check_config: bool = True,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the whole check (see the module docstring) and return the report."""
    report = Report()
    torch.manual_seed(seed)
    t = time.perf_counter()
    ours, cfg = build_ours(config_file, opts)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    num_prototypes = cfg.MODEL.PROTOSEG.NUM_PROTOTYPES
    report.timings["build ours"] = time.perf_counter() - t
    t = time.perf_counter()
    official, standin = build_official(official_root, num_classes, num_prototypes)
    report.timings["build official"] = time.perf_counter() - t
    log(f"official model built ({'einops stand-in' if standin else 'einops installed'})")
    randomize_official_state(official, seed)

    with tempfile.TemporaryDirectory() as tmp:
        official_path = os.path.join(tmp, "official_protoseg.pth")
        state = {"module." + k: v for k, v in official.state_dict().items()}
        torch.save(
            {"config_dict": {"network": {"backbone": "hrnet48"}}, "state_dict": state},
            official_path,
        )
        converted_path = os.path.join(tmp, "converted.pth")
        converter = _load_converter()
        t = time.perf_counter()
        check = ["--config-file", config_file, *opts] if check_config else []
        converter.main([official_path, converted_path, *check])
        report.timings["convert"] = time.perf_counter() - t
        SegCheckpointer(ours, strict=True).load(converted_path)

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, *size, generator=g)  # an already normalised batch
    t = time.perf_counter()
    captured = {}
    hook = official.backbone.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("official", out)
    )
    with torch.no_grad():
        off_logits = official(x)  # (B, C, h, w)
    hook.remove()
    off_branches = captured["official"]
    with torch.no_grad():
        # nearest prototype of the official model, from its own embedding path
        off_emb = _official_embedding(official, off_branches)
        off_cos = torch.einsum("bdhw,kmd->bkmhw", off_emb, F.normalize(official.prototypes, dim=-1))
    report.timings["official forward"] = time.perf_counter() - t
    t = time.perf_counter()
    hook = ours.backbone.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("ours", list(out.values()))
    )
    # capture the (B, C, M, h, w) cosines forward_head computes, through an instance attribute
    # shadowing the method for this one call
    method = ours.prototype_cosines
    ours.prototype_cosines = lambda e, p=None: captured.setdefault("cos", method(e, p))
    try:
        with torch.no_grad():
            our_logits = ours.forward_head(x)["sem_seg"]
    finally:
        del ours.prototype_cosines
        hook.remove()
    our_branches, our_cos = captured["ours"], captured["cos"]
    report.timings["our forward"] = time.perf_counter() - t

    for i, (a, b) in enumerate(zip(our_branches, off_branches)):
        diff = _max(a - b) if a.shape == b.shape else float("inf")
        report.rows.append(
            Row(f"backbone branch {i} {tuple(b.shape)}", diff, _max(b), diff <= rtol * _max(b))
        )
    diff = _max(our_logits - off_logits) if our_logits.shape == off_logits.shape else float("inf")
    report.rows.append(
        Row(
            f"class logits {tuple(off_logits.shape)}",
            diff,
            _max(off_logits),
            diff <= rtol * _max(off_logits),
        )
    )
    report.rows.append(
        _map_row("argmax class", our_logits.argmax(1), off_logits.argmax(1), off_logits, margin)
    )
    b, c, m, h, w = off_cos.shape
    report.rows.append(
        _map_row(
            "nearest prototype c*M+m",
            our_cos.reshape(b, c * m, h, w).argmax(1),
            off_cos.reshape(b, c * m, h, w).argmax(1),
            off_cos.reshape(b, c * m, h, w),
            margin,
        )
    )
    if info_rows:
        _add_info_rows(report, ours, x, off_logits, off_branches)
    return report


def _add_info_rows(report, ours, x, off_logits, off_branches) -> None:
    """Rows showing what the two official conventions change (ok regardless)."""
    # our default L2 axis on the same weights
    ours.projection_l2_axis = "channels"
    with torch.no_grad():
        alt = ours.forward_head(x)["sem_seg"]
    ours.projection_l2_axis = "width"
    report.rows.append(
        Row(
            "class logits, L2 over channels (info)",
            _max(alt - off_logits),
            _max(off_logits),
            True,
            "our default axis; not expected to match",
        )
    )
    # timm's own HRNet fusion upsampling (nearest) instead of bilinear align_corners=True
    set_upsample_mode(ours.backbone.model, "nearest")
    with torch.no_grad():
        alt = list(ours.backbone(x).values())[0]
    set_upsample_mode(ours.backbone.model, "bilinear_align_corners")
    report.rows.append(
        Row(
            "branch 0, timm nearest fusion (info)",
            _max(alt - off_branches[0]),
            _max(off_branches[0]),
            True,
            "MODEL.TIMM.UPSAMPLE_MODE ''; not expected to match",
        )
    )


def _official_embedding(official, branches) -> torch.Tensor:
    """The official embedding path (``HRNet_W48_Proto.forward`` up to ``_c``), as (B, D, h, w).

    Calls the official modules in the official order; used only to get the per-pixel nearest
    prototype, which the official forward does not return at inference.
    """
    h, w = branches[0].shape[-2:]
    feats = [branches[0]] + [
        F.interpolate(f, size=(h, w), mode="bilinear", align_corners=True) for f in branches[1:]
    ]
    c = official.proj_head(official.cls_head(torch.cat(feats, 1)))  # (B, D, h, w)
    c = F.normalize(official.feat_norm(c.permute(0, 2, 3, 1)), dim=-1)
    return c.permute(0, 3, 1, 2)


def _load_converter():
    path = os.path.join(REPO, "tools", "convert_protoseg_weights.py")
    spec = importlib.util.spec_from_file_location("convert_protoseg_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--official-root", required=True, help="tfzhou/ProtoSeg source (lib/)")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 128], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--margin", type=float, default=1e-4)
    parser.add_argument("--no-info-rows", action="store_true", help="skip the two info rows")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args = parser.parse_args(argv)
    report = compare(
        args.official_root,
        args.config_file,
        opts=args.opts,
        size=tuple(args.size),
        batch=args.batch,
        seed=args.seed,
        rtol=args.rtol,
        margin=args.margin,
        info_rows=not args.no_info_rows,
    )
    print(report.format())
    print("PARITY OK" if report.ok else "PARITY FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
