#!/usr/bin/env python
"""Compare seg_methods' CRM with the official code on one random official-format checkpoint.

Usage:
    python tools/compare_with_official_crm.py [--official-root DIR] [--seed 0] \
        [--size 96 80] [--queries 3000] [--chunk 5000] [--save-state official_random.pth]

The official code (dvlab-research/Entity ``High-Quality-Segmention``; ``--official-root``, default
``$CRM_OFFICIAL_ROOT``, else /work/ref/High-Quality-Segmention) is imported at run time from that
folder, never copied or edited. Its unconditional CUDA calls (``Tensor.cuda()`` in
``models/network/crm.py``; ``torch.cuda.synchronize`` and ``torch.cuda.Event`` timers in
``crm_transferCoord_transferFeat.py``) are redirected to the CPU while it runs (monkeypatches,
restored afterwards). The official extractor is built with ``pretrained=False`` (no download).

Steps:

1. build the official ``CRMNet(backend="resnet50", pretrained=False)``; give its BatchNorm layers
   running statistics by one train-mode pass on a random batch (so the eval-mode network has
   normalised activations), and take its state dict with DataParallel's ``module.`` prefix: ONE
   random official-format checkpoint (``--save-state`` writes it);
2. convert it with ``tools/convert_crm_weights.py`` and load it strictly into our CRM built from
   configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml;
   load the same dict into the official ``crm.CRMNet`` and
   ``crm_transferCoord_transferFeat.CRMNet`` (the one ``test.py`` uses);
3. single scale: a random image and coarse mask, ``--queries`` random continuous query points and
   cells: official ``CRMNet.forward(x, seg, coord, cell)["out_224"]`` against our
   ``encode`` + ``query`` logits;
4. cascade: ``test.py``'s loop (re-stated here, since ``test.py`` is a script: reflect padding 32,
   scales 0.125 / 0.25 / 0.5 / 1, ``--chunk`` queries per call with the features transferred
   between chunks, empty-mask suppression, ``(pred - 0.5) * 2`` fed to the next scale, crop)
   with the official network, against our ``cascade_refine`` (same normalised inputs), our
   ``CRM.refine`` (raw image: our normalisation) and our ``cascade_refine`` with the latent map
   fused in strips of 16 rows (``MODEL.CRM.FUSION_TILE_ROWS``).

Prints and returns the maximum absolute differences (eval mode, float32, CPU).
"""

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_OFFICIAL_ROOT = "/work/ref/High-Quality-Segmention"
OUR_CONFIG = os.path.join(
    REPO,
    "configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml",
)
# official eval pipeline (dataset/offline_dataset_crm_pad32.py): ImageNet mean/std on [0, 1]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def official_root(arg: Optional[str] = None) -> str:
    """``arg``, else $CRM_OFFICIAL_ROOT, else the default path."""
    return arg or os.environ.get("CRM_OFFICIAL_ROOT") or DEFAULT_OFFICIAL_ROOT


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event(enable_timing=True)`` (the official timers)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


@contextlib.contextmanager
def cuda_calls_on_cpu() -> Iterator[None]:
    """Redirect the official code's CUDA-only calls to the CPU (restored on exit)."""
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.synchronize, torch.cuda.Event)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Event = _CpuEvent
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.synchronize, torch.cuda.Event = saved


def import_official(root: str) -> Tuple[object, object]:
    """Import the official ``models.network.crm`` and ``crm_transferCoord_transferFeat``.

    The official package is named ``models``; any ``models*`` entries of ``sys.modules`` are
    restored afterwards so that nothing else sees it.
    """
    if not os.path.isfile(os.path.join(root, "models", "network", "crm.py")):
        raise FileNotFoundError(
            f"official CRM code not found under '{root}' (expected models/network/crm.py); pass "
            "--official-root or set CRM_OFFICIAL_ROOT"
        )
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        crm = importlib.import_module("models.network.crm")
        crm_tf = importlib.import_module("models.network.crm_transferCoord_transferFeat")
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return crm, crm_tf


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_official_state(crm_module, seed: int, calib_size: int = 64) -> Dict[str, torch.Tensor]:
    """One random official-format state dict (``module.``-prefixed, as ``train.py`` saves it).

    Weights: the official initialisation under ``torch.manual_seed(seed)``, MLP biases drawn
    from N(0, 0.1) and the last MLP layer's weights x 30 (logits of a few units, so that the
    cascade's probabilities are not all ~0.5); BatchNorm running statistics: those of one
    train-mode pass on a random batch (so that the eval-mode network has normalised
    activations).
    """
    torch.manual_seed(seed)
    with cuda_calls_on_cpu(), contextlib.redirect_stdout(open(os.devnull, "w")):
        net = crm_module.CRMNet(backend="resnet50", pretrained=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0  # running statistics := those of the calibration batch
    net.train()
    with torch.no_grad():
        image = torch.randn(4, 3, calib_size, calib_size)
        mask = torch.rand(4, 1, calib_size, calib_size) * 2 - 1
        net.aspp_(*net.feats(torch.cat([image, mask], dim=1)))
    for m in bns:
        m.momentum = 0.1
    with torch.no_grad():  # non-trivial MLP biases; logits spanning a few units (not ~0)
        linears = [m for m in net.imnet.modules() if isinstance(m, torch.nn.Linear)]
        for m in linears:
            m.bias.normal_(0.0, 0.1)
        linears[-1].weight.mul_(30.0)
    return {f"module.{k}": v.clone() for k, v in net.state_dict().items()}


def build_ours(official_state: Dict[str, torch.Tensor], config_file: str = OUR_CONFIG):
    """Our CRM (eval mode) with the converted official weights, loaded strictly."""
    from detectron2.modeling import build_model

    from seg_methods.config import get_cfg

    convert = _load_tool("convert_crm_weights")
    converted, _ = convert.convert(official_state)
    converted = convert.check_against_model(converted, config_file)
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    incompatible = model.load_state_dict(converted, strict=False)
    missing = [k for k in incompatible.missing_keys if k not in ("pixel_mean", "pixel_std")]
    if missing or incompatible.unexpected_keys:
        raise RuntimeError(
            f"converted weights: missing {missing}, unexpected " f"{incompatible.unexpected_keys}"
        )
    return model.eval()


def build_official(module, official_state: Dict[str, torch.Tensor]):
    """An official CRMNet (eval mode) holding ``official_state``."""
    with cuda_calls_on_cpu(), contextlib.redirect_stdout(open(os.devnull, "w")):
        net = module.CRMNet(backend="resnet50", pretrained=False)
    net.load_state_dict({k[len("module.") :]: v for k, v in official_state.items()})
    return net.eval()


def make_inputs(size: Sequence[int], seed: int) -> Dict[str, torch.Tensor]:
    """A random RGB image (uint8), a blobby coarse mask in [0, 1], both normalised as the
    official test set does (image: ImageNet mean/std on [0, 1]; mask: (m - 0.5) / 0.5)."""
    g = torch.Generator().manual_seed(seed)
    h, w = int(size[0]), int(size[1])
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    blob = F.interpolate(torch.rand(1, 1, 6, 6, generator=g), size=(h, w), mode="bilinear")
    mask = (blob[0, 0] > 0.5).float()
    im = (image.float() / 255 - torch.tensor(_MEAN).view(3, 1, 1)) / torch.tensor(_STD).view(
        3, 1, 1
    )
    return {"image": image, "mask": mask, "im": im[None], "seg": ((mask - 0.5) / 0.5)[None, None]}


def official_cascade(
    net,
    crm_tf_module,
    im: torch.Tensor,
    seg: torch.Tensor,
    chunk: int,
    scales=(0.125, 0.25, 0.5, 1.0),
    pad: int = 32,
) -> torch.Tensor:
    """The multi-scale loop of the official ``test.py`` (batch 1, as there), with its
    inputs prepared as ``dataset/offline_dataset_crm_pad32.py`` does (reflect padding 32, pixel
    coordinates and cells of the padded image). Returns the cropped (H, W) probability."""
    im = F.pad(im, (pad, pad, pad, pad), mode="reflect")
    seg = F.pad(seg, (pad, pad, pad, pad), mode="reflect")
    hp, wp = im.shape[-2:]
    coord = crm_tf_module.make_coord((hp, wp)).unsqueeze(0)
    cell = torch.ones_like(coord)
    cell[..., 0] *= 2 / hp
    cell[..., 1] *= 2 / wp
    with cuda_calls_on_cpu():
        for s in scales:
            size = (round(im.shape[-2] * s), round(im.shape[-1] * s))
            im_ = F.interpolate(im, size=size, mode="bilinear", align_corners=True)
            seg_ = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
            images, feat, feat_coord = {}, None, None
            for i in range(0, hp * wp, chunk):
                args = dict(coord=coord[:, i : i + chunk], cell=cell[:, i : i + chunk])
                if feat is None:
                    out, feat_coord, feat = net(im_, seg_, **args)
                else:
                    out = net(im_, seg_, transferCoord=feat_coord, transferFeat=feat, **args)
                for k, v in out.items():
                    images[k] = v if k not in images else torch.cat((images[k], v), 1)
            pred = images["pred_224"].view(1, 1, hp, wp)
            if (seg[0] + 1).sum() < 2:
                pred[0] = 0
            seg = ((pred[0].float() - 0.5) * 2).unsqueeze(0)
    return pred[0, 0, pad:-pad, pad:-pad]


def compare(
    root: Optional[str] = None,
    seed: int = 0,
    size: Sequence[int] = (96, 80),
    queries: int = 3000,
    chunk: int = 5000,
    save_state: Optional[str] = None,
) -> Dict[str, float]:
    """Run steps 1-4 (module docstring); returns the maximum absolute differences."""
    from seg_methods.modeling.refinement.crm import cascade_refine

    crm, crm_tf = import_official(official_root(root))
    state = random_official_state(crm, seed)
    if save_state:
        torch.save(state, save_state)
    ours = build_ours(state)
    ref = build_official(crm, state)
    ref_tf = build_official(crm_tf, state)
    inputs = make_inputs(size, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    coord = torch.rand(1, queries, 2, generator=g) * 2 - 1
    cell = torch.full((1, queries, 2), 2.0 / size[0]) * (
        0.25 + torch.rand(1, queries, 1, generator=g)
    )
    result = {}
    with torch.no_grad():
        with cuda_calls_on_cpu():
            ref_logits = ref(inputs["im"], inputs["seg"], coord, cell)["out_224"][..., 0]
        our_logits = ours.query(ours.encode(inputs["im"], inputs["seg"]), coord, cell)
        result["single_scale_logits"] = float((our_logits - ref_logits).abs().max())
        result["single_scale_logit_range"] = float(ref_logits.abs().max())
        ref_prob = official_cascade(ref_tf, crm_tf, inputs["im"], inputs["seg"], chunk)
        our_prob = cascade_refine(ours, inputs["im"], inputs["seg"], chunk=chunk, pad=32)
        result["cascade_prob"] = float((our_prob - ref_prob).abs().max())
        api_prob = ours.refine(inputs["image"], inputs["mask"])
        result["cascade_prob_via_refine"] = float((api_prob - ref_prob).abs().max())
        ours.fusion_tile_rows = 16  # our strip-wise fusion (MODEL.CRM.FUSION_TILE_ROWS)
        tiled = cascade_refine(ours, inputs["im"], inputs["seg"], chunk=chunk, pad=32)
        result["cascade_prob_tiled_fusion"] = float((tiled - ref_prob).abs().max())
        result["cascade_prob_std"] = float(ref_prob.std())
        result["cascade_binary_disagreement"] = float(
            ((our_prob > 0.5) != (ref_prob > 0.5)).float().mean()
        )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 80), metavar=("H", "W"))
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--save-state", default=None, help="write the random official checkpoint")
    args = parser.parse_args(argv)
    result = compare(
        args.official_root, args.seed, args.size, args.queries, args.chunk, args.save_state
    )
    for k, v in result.items():
        print(f"{k:32s} {v:.3g}")
    return result


if __name__ == "__main__":
    main()
