"""``export_model``: trace a meta-architecture's inference to TorchScript or ONNX and verify it.

The exported graph takes one (3, H, W) uint8 image in ``cfg.INPUT.FORMAT`` channel order at a
fixed size (the size it was traced at; resize before calling it) and returns the outputs of
:class:`~seg_methods.export.wrapper.ExportWrapper`. Normalisation, padding and the resize of the
outputs to (H, W) are inside the graph.

Every export is checked against eager inference on two images: the tracing image and a
different one (the tracing image flipped vertically and horizontally), because a trace that
recorded data-dependent Python would match only on the first. The maximum differences are
returned and stored in the metadata.

Files written to ``output_dir``:

- ``model.ts`` (TorchScript, ``torch.jit.load``-able; the metadata JSON is embedded as the extra
  file ``seg_methods_export.json``) or ``model.onnx``;
- ``seg_methods_export.json``: the same metadata (input, output names, classes and colours, the
  compiled ops the graph calls, the measured differences).

TorchScript graphs call the compiled ops as ``torch.ops.seg_methods.*``; loading one needs them
registered first: ``torch.ops.load_library("<path>/_C....so")`` (what ``demo/deploy_torchscript.py``
does, without seg_methods) or ``seg_methods.utils.ext.load_extension()``.

The graph is specialised to the tracing size: Mask2Former's traced graph raises on another size
(its level sizes are constants of the trace); other models may run at other sizes, but only the
tracing size is verified. Resize inputs to ``metadata["input"]["shape"]``. ONNX has
no symbolic for these ops, so ONNX export runs every layer through its pure-PyTorch reference
(:func:`~seg_methods.export.wrapper.reference_ops`); a layer configured to *require* the op
(``DEFORM_ATTN_IMPL: "op"``, ``CLUSTER_IMPL: "ext"``) cannot be exported to ONNX.
"""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .wrapper import (
    TRACEABLE_OUTPUTS,
    ExportWrapper,
    check_output_names,
    flatten_outputs,
    inline_autograd_functions,
    reference_ops,
)

__all__ = ["ExportResult", "ExportVerificationError", "export_model", "output_differences"]

FORMATS = ("torchscript", "onnx")
METADATA_NAME = "seg_methods_export.json"
logger = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The exported model's outputs differ from eager inference beyond the tolerance."""


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        path (str): the exported model file.
        metadata_path (str): the metadata JSON next to it.
        output_names (list[str]): the exported outputs, in graph order.
        ops (list[str]): ``seg_methods::*`` ops the exported graph calls (TorchScript only).
        max_abs_diff (dict): {"trace_image": {name: float}, "check_image": {name: float}}, the
            maximum absolute difference to eager inference (mismatching elements for integer
            and boolean outputs; inf for a shape mismatch); empty dicts when not verified.
        verified (bool): False only for ONNX without onnxruntime installed.
    """

    path: str
    metadata_path: str
    output_names: List[str]
    ops: List[str]
    max_abs_diff: Dict[str, Dict[str, float]]
    verified: bool


def output_differences(
    got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], names: Sequence[str]
) -> Dict[str, float]:
    """Per output: max |got - want| for floating tensors, the number of differing elements
    for integer/boolean ones, inf when the shapes differ."""
    diffs = {}
    for name, a, b in zip(names, got, want):
        a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
        if a.shape != b.shape:
            diffs[name] = float("inf")
        elif a.numel() == 0:
            diffs[name] = 0.0
        elif b.is_floating_point():
            diffs[name] = float((a.double() - b.double()).abs().max())
        else:
            diffs[name] = float((a.to(b.dtype) != b).sum())
    return diffs


def _metadata_from_cfg(cfg) -> Dict:
    """Class names / colours / thing ids of the config's first test (else train) dataset."""
    from detectron2.data import MetadataCatalog

    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        return {}
    meta = MetadataCatalog.get(names[0])
    out = {"dataset": names[0]}
    for key in ("stuff_classes", "stuff_colors", "thing_classes", "thing_colors"):
        value = getattr(meta, key, None)
        if value is not None:
            out[key] = [list(v) if isinstance(v, (list, tuple)) else v for v in value]
    return out


@contextlib.contextmanager
def _quiet_tracer():
    """Silence tracer warnings (Python values recorded as constants): the models read sizes
    and loop bounds as Python numbers, which is expected for a fixed-size export; outputs that
    depend on data through Python are caught by the verification on a second image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _graph_ops(scripted: torch.jit.ScriptModule) -> List[str]:
    kinds = {node.kind() for node in scripted.inlined_graph.nodes()}
    return sorted(k for k in kinds if k.startswith("seg_methods::"))


def _check_tolerance(diffs: Dict[str, Dict[str, float]], atol: float) -> None:
    bad = {
        f"{image}/{name}": d
        for image, per in diffs.items()
        for name, d in per.items()
        if not d <= atol
    }
    if bad:
        raise ExportVerificationError(
            f"exported outputs differ from eager inference beyond atol={atol}: {bad}. An output "
            "that matches on the tracing image but not on the check image depends on "
            "data-dependent Python that tracing baked in (see seg_methods/export/wrapper.py)."
        )


def export_model(
    cfg,
    model: nn.Module,
    format: str,
    output_dir: str,
    *,
    sample_image: Optional[torch.Tensor] = None,
    image_size: Optional[Tuple[int, int]] = None,
    outputs: Optional[Sequence[str]] = None,
    check_image: Optional[torch.Tensor] = None,
    atol: float = 1e-4,
    reference_ops_only: bool = False,
    opset_version: int = 17,
) -> ExportResult:
    """Export the inference of ``model`` (built from ``cfg``) and verify it against eager.

    Args:
        cfg (CfgNode): the model's config (input format, datasets for class names).
        model (nn.Module): the meta-architecture, weights loaded; put in eval mode here.
        format (str): "torchscript" or "onnx".
        output_dir (str): folder for ``model.ts`` / ``model.onnx`` and the metadata JSON.
        sample_image (Tensor, optional): (3, H, W) uint8 tracing image in ``cfg.INPUT.FORMAT``;
            default: a random image of ``image_size``.
        image_size (tuple, optional): (H, W) of the random tracing image; default
            (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST).
        outputs (sequence[str], optional): outputs to export ("sem_seg", "superpixels",
            "instances"); default: those of :data:`TRACEABLE_OUTPUTS` the model returns, and
            "instances" when the model returns no "panoptic_seg".
        check_image (Tensor, optional): a second image of the same size to verify on; default:
            ``sample_image`` flipped both ways.
        atol (float): tolerance of the verification (floating outputs; integer outputs must be
            equal).
        reference_ops_only (bool): trace every ``impl="auto"`` layer through its pure-PyTorch
            reference, so that the TorchScript graph needs no compiled library (always the case
            for ONNX). Eager inference is then compared with the reference path too.
        opset_version (int): ONNX opset.

    Returns:
        ExportResult

    Raises:
        ValueError: bad format or output names.
        ExportVerificationError: the exported model's outputs differ from eager inference.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    model.eval()
    device = next(model.parameters()).device
    if sample_image is None:
        size = image_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
        gen = torch.Generator().manual_seed(0)
        sample_image = torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)
    if sample_image.dim() != 3 or sample_image.shape[0] != 3:
        raise ValueError(f"sample_image must be (3, H, W), got {tuple(sample_image.shape)}")
    sample_image = sample_image.to(device)
    if check_image is None:
        check_image = sample_image.flip(1, 2)
    check_image = check_image.to(device)
    if check_image.shape != sample_image.shape:
        raise ValueError(
            f"check_image {tuple(check_image.shape)} must have the tracing image's shape "
            f"{tuple(sample_image.shape)} (the export is specialised to its size)"
        )

    use_reference = reference_ops_only or format == "onnx"
    ops_context = reference_ops if use_reference else contextlib.nullcontext
    with torch.no_grad(), ops_context():
        eager_sample = model([{"image": sample_image}])[0]
        eager_check = model([{"image": check_image}])[0]
    available = list(eager_sample)
    if outputs is None:
        outputs = [k for k in TRACEABLE_OUTPUTS if k in available]
        if "instances" in available and "panoptic_seg" not in available:
            outputs.append("instances")  # no stuff filtering by a Python list (see wrapper.py)
        if not outputs:
            raise ValueError(
                f"the model returns {available}, none of which can be traced faithfully "
                f"(exportable: {list(TRACEABLE_OUTPUTS)} and 'instances')"
            )
    names = check_output_names(outputs, available)
    want = {
        "trace_image": flatten_outputs(eager_sample, names),
        "check_image": flatten_outputs(eager_check, names),
    }
    wrapper = ExportWrapper(model, names).eval()
    os.makedirs(output_dir, exist_ok=True)
    metadata = {
        "format": format,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "input": {
            "name": "image",
            "shape": list(sample_image.shape),
            "dtype": str(sample_image.dtype).replace("torch.", ""),
            "channel_format": cfg.INPUT.FORMAT,
        },
        "outputs": names,
        "reference_ops_only": use_reference,
        **_metadata_from_cfg(cfg),
    }

    ops: List[str] = []
    verified = True
    if format == "torchscript":
        path = os.path.join(output_dir, "model.ts")
        with torch.no_grad(), ops_context(), inline_autograd_functions(), _quiet_tracer():
            traced = torch.jit.trace(wrapper, (sample_image,), check_trace=False)
        ops = _graph_ops(traced)
        traced.save(path)  # saved once without metadata to reload and verify
        loaded = torch.jit.load(path, map_location=device)
        with torch.no_grad():
            got = {"trace_image": loaded(sample_image), "check_image": loaded(check_image)}
    else:
        if importlib.util.find_spec("onnx") is None:
            raise RuntimeError(
                "ONNX export needs the 'onnx' package (torch.onnx writes the file with it), "
                "which is not installed; install onnx (and onnxruntime to verify the file)"
            )
        path = os.path.join(output_dir, "model.onnx")
        with torch.no_grad(), ops_context(), inline_autograd_functions(), _quiet_tracer():
            torch.onnx.export(
                wrapper,
                (sample_image,),
                path,
                dynamo=False,
                input_names=["image"],
                output_names=names,
                opset_version=opset_version,
            )
        got = _run_onnx(path, {"trace_image": sample_image, "check_image": check_image})
        verified = got is not None

    diffs: Dict[str, Dict[str, float]] = {}
    if verified:
        diffs = {k: output_differences(got[k], want[k], names) for k in want}
    metadata.update({"ops": ops, "max_abs_diff": diffs, "verified": verified})
    meta_json = json.dumps(metadata, indent=2)
    if format == "torchscript":
        traced.save(path, _extra_files={METADATA_NAME: meta_json})
    metadata_path = os.path.join(output_dir, METADATA_NAME)
    with open(metadata_path, "w") as f:
        f.write(meta_json)
    logger.info(
        f"exported {cfg.MODEL.META_ARCHITECTURE} to {path}; max |exported - eager|: {diffs}"
    )
    if verified:
        _check_tolerance(diffs, atol)
    return ExportResult(path, metadata_path, names, ops, diffs, verified)


def _run_onnx(path: str, images: Dict[str, torch.Tensor]) -> Optional[Dict[str, List]]:
    """Outputs of the ONNX file under onnxruntime per image, or None when it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning(f"onnxruntime is not installed: {path} was written but not verified")
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return {
        key: [torch.from_numpy(o) for o in session.run(None, {"image": img.cpu().numpy()})]
        for key, img in images.items()
    }
