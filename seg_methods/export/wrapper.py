"""A tensor-in, tensors-out view of any seg_methods meta-architecture, for tracing.

:class:`ExportWrapper` calls a model in inference mode on one image, exactly as detectron2's
``DefaultPredictor`` does after its resize (``model([{"image": image}])[0]``), and returns the
outputs that tracing records faithfully as a tuple of tensors, in the order of
``wrapper.output_names``:

- ``sem_seg``: (C, H, W) float32 per-class scores (their argmax is the semantic map);
- ``superpixels``: (H, W) int64 superpixel index of every pixel (ClustSeg's superpixel task);
- ``instances.pred_masks`` (K, H, W) bool, ``instances.scores`` (K,) float32,
  ``instances.pred_classes`` (K,) int64 contiguous ids: when panoptic inference is off (see
  below).

Nothing here is specific to a method: any meta-architecture whose inference returns these keys
(the mask-classification models, a per-pixel semantic model) is covered.

What tracing cannot record (and is therefore not exported):

* ``panoptic_seg``: every panoptic merge (Mask2Former's ``panoptic_inference``, CMT-DeepLab's
  ``mask_wise_merge`` / ``per_pixel_merge``) loops in Python over the kept queries and reads
  their classes and areas with ``.item()``. A trace replays the loop of the image it was traced
  with (its number of segments, their classes), so it would be wrong on any other image.
  :data:`UNTRACEABLE_OUTPUTS` lists it; :func:`check_output_names` refuses it.
* ``instances`` when panoptic inference is on too: the stuff classes are then removed with a
  Python list of the top-k labels, which tracing bakes in as a constant. By default instances
  are exported only when the model returns no panoptic output; on request they are exported
  anyway, and :func:`seg_methods.export.export_model` then fails its comparison with eager
  inference on a second image.

Two context managers make a model traceable without changing it:

* :func:`inline_autograd_functions`: the compiled ops of ``seg_methods._C`` are called through
  private ``torch.autograd.Function`` wrappers, which ``torch.jit.trace`` records as Python calls
  that cannot be saved. Inside the context, every ``Function`` subclass defined in a
  ``seg_methods`` module runs its ``forward`` directly (inference needs no backward), so the trace
  records the ``torch.ops.seg_methods.*`` calls themselves.
* :func:`reference_ops`: hides the compiled extension, so every ``impl="auto"`` layer runs its
  pure-PyTorch reference (needed for ONNX: the custom ops have no ONNX symbolic).
"""

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "ExportWrapper",
    "TRACEABLE_OUTPUTS",
    "UNTRACEABLE_OUTPUTS",
    "INSTANCE_FIELDS",
    "check_output_names",
    "flatten_outputs",
    "inline_autograd_functions",
    "reference_ops",
]

INSTANCE_FIELDS = ("pred_masks", "scores", "pred_classes")
# model output key -> exported as-is (a tensor)
TRACEABLE_OUTPUTS = ("sem_seg", "superpixels")
# model output key -> why it is not exported
UNTRACEABLE_OUTPUTS = {
    "panoptic_seg": (
        "panoptic merging loops in Python over the kept queries and reads their classes with "
        ".item(); a trace would replay the segments of the tracing image on every input"
    ),
}


def check_output_names(names: Sequence[str], available: Sequence[str]) -> List[str]:
    """Validate requested output names against what the model returned eagerly.

    Args:
        names (sequence[str]): requested names: "sem_seg", "superpixels", "instances" (expands
            to the three ``instances.*`` tensors) or an ``instances.<field>`` name.
        available (sequence[str]): keys of the model's eager output dict.

    Returns:
        list[str]: the flat output names, in request order.

    Raises:
        ValueError: a name is untraceable, unknown, or not produced by this model.
    """
    flat: List[str] = []
    for name in names:
        base = name.split(".", 1)[0]
        if base in UNTRACEABLE_OUTPUTS:
            raise ValueError(f"output {name!r} cannot be exported: {UNTRACEABLE_OUTPUTS[base]}")
        if base not in TRACEABLE_OUTPUTS and base != "instances":
            raise ValueError(
                f"unknown output {name!r}; exportable: {list(TRACEABLE_OUTPUTS) + ['instances']}"
            )
        if base not in available:
            raise ValueError(
                f"output {name!r} requested but the model returns only {sorted(available)} "
                "(check the TEST.*_ON flags / the task of the config)"
            )
        if name == "instances":
            flat += [f"instances.{f}" for f in INSTANCE_FIELDS]
        elif base == "instances":
            field = name.split(".", 1)[1]
            if field not in INSTANCE_FIELDS:
                raise ValueError(f"unknown instance field {field!r}; one of {INSTANCE_FIELDS}")
            flat.append(name)
        else:
            flat.append(name)
    if not flat:
        raise ValueError("no output to export")
    return flat


def flatten_outputs(result: Dict, names: Sequence[str]) -> Tuple[torch.Tensor, ...]:
    """The tensors named ``names`` (see :func:`check_output_names`) of one image's result dict."""
    out = []
    for name in names:
        if name.startswith("instances."):
            out.append(getattr(result["instances"], name.split(".", 1)[1]))
        else:
            out.append(result[name])
    return tuple(out)


class ExportWrapper(nn.Module):
    """One image in, a tuple of tensors out (see the module docstring).

    Args:
        model (nn.Module): a seg_methods / detectron2 meta-architecture taking
            ``list[{"image": (3, H, W)}]`` and returning one result dict per image.
        output_names (sequence[str]): flat output names (:func:`check_output_names`).
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """
        Args:
            image (Tensor): (3, H, W) in the model's input format (cfg.INPUT.FORMAT channel order,
                0..255, usually uint8), already at the size the model should see.

        Returns:
            tuple[Tensor]: one tensor per name of ``self.output_names``, at (H, W).
        """
        result = self.model([{"image": image}])[0]
        return flatten_outputs(result, self.output_names)


class _InferenceCtx:
    """Stand-in for an autograd ``ctx`` when a Function's ``forward`` is called directly."""

    def __init__(self, num_inputs: int):
        self.needs_input_grad = (False,) * num_inputs
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def mark_dirty(self, *args):
        pass

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = value


def _seg_methods_functions() -> List[type]:
    """Every ``torch.autograd.Function`` subclass defined in a ``seg_methods`` module."""
    found, stack = [], list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("seg_methods"):
            found.append(cls)
    return found


@contextlib.contextmanager
def inline_autograd_functions() -> Iterator[List[type]]:
    """Run seg_methods' autograd Functions as plain calls of their ``forward`` (see module doc).

    Only valid without gradients (the backward is never set up); used for tracing under
    ``torch.no_grad()``. Yields the patched classes.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("inline_autograd_functions() must be used under torch.no_grad()")
    classes = _seg_methods_functions()
    patched = []
    try:
        for cls in classes:
            if "apply" in cls.__dict__:  # a class that defines its own apply: leave it
                continue

            def apply(klass, *args):
                return klass.forward(_InferenceCtx(len(args)), *args)

            cls.apply = classmethod(apply)
            patched.append(cls)
        yield patched
    finally:
        for cls in patched:
            del cls.apply


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Hide ``seg_methods._C`` so that every ``impl="auto"`` layer runs its PyTorch reference.

    A layer configured with ``impl="op"`` / ``"ext"`` (which requires the compiled op) raises its
    own error inside the context; configure it with ``"auto"`` or ``"pytorch"`` to export it
    through the reference path.
    """
    from seg_methods.utils import ext

    ext.load_extension()
    saved = (ext._ext, ext._ext_error)
    ext._ext, ext._ext_error = None, "hidden by seg_methods.export.reference_ops()"
    try:
        yield
    finally:
        ext._ext, ext._ext_error = saved
