"""Export of any meta-architecture's inference to TorchScript / ONNX for deployment.

``export_model(cfg, model, "torchscript" | "onnx", output_dir)`` (:mod:`.api`) traces
:class:`ExportWrapper` (:mod:`.wrapper`): one (3, H, W) uint8 image in -> a tuple of tensors,
with no method-specific code, then checks the exported file against eager inference on the
tracing image and on a different one. ``tools/export_model.py`` is its command line and
``demo/deploy_torchscript.py`` runs the result with torch and the compiled op library only.

What is exported (tracing size fixed; "verified": equal to eager on a second image, max
difference 0 on the CPU in tests/modeling/test_model_e2e.py):

================  =================================  ==================================
meta-arch         exported outputs                   compiled ops in the TorchScript graph
================  =================================  ==================================
Mask2Former       sem_seg; instances when            ms_deform_attn_forward
                  TEST.PANOPTIC_ON is off            (DEFORM_ATTN_IMPL "auto" / "op")
ClustSeg          sem_seg (panoptic, semantic);      soft_cluster_forward; k-means
                  instances (instance task);         variant: hard_cluster_argmax,
                  superpixels (superpixel task)      hard_cluster_reduce
CMTDeepLab        sem_seg; instances when            soft_cluster_forward
                  TEST.PANOPTIC_ON is off            (CLUSTER_IMPL "auto" / "ext")
PerPixelSemantic  sem_seg                            none
PISR              sem_seg (all three bases)          ms_deform_attn_forward (Mask2Former
                                                     base); none (Panoptic-FPN / -DeepLab)
DenseAffinity-    sem_seg; instances when            none
Panoptic          TEST.PANOPTIC_ON is off (ROI
                  heads traced under detectron2's
                  patch_builtin_len)
PanopticSegFormer sem_seg                            ms_deform_attn_forward
================  =================================  ==================================

Not exported, for every meta-architecture: ``panoptic_seg`` (the panoptic merges loop in Python
over the kept queries; a trace would replay the tracing image's segments), instances filtered
to thing classes when panoptic inference is on (a Python list, baked in by tracing), and
per-input options read from the input dict (``"height"``/``"width"``, ClustSeg's
``"num_superpixels"``: the exported graph uses the config's ``SUPERPIXEL.TEST_NUM``).

ONNX: the custom ops have no ONNX symbolic (exporting them fails with torch's
UnsupportedOperatorError), so ONNX export always traces the pure-PyTorch reference of each op
(:func:`reference_ops`; Mask2Former's deformable attention becomes GridSample, opset >= 16); a
model configured to *require* a compiled op (``DEFORM_ATTN_IMPL: "op"``, ``CLUSTER_IMPL:
"ext"``) cannot be exported to ONNX. Writing the file needs the ``onnx`` package, verifying it
``onnxruntime``; neither is installed on the development machine, where the four models'
reference graphs passed torch's ONNX conversion up to the final step that imports ``onnx``.

The graph is specialised to the tracing size (Mask2Former's graph raises at another size);
deployment resizes the image to ``metadata["input"]["shape"]``.
"""

from .api import ExportResult, ExportVerificationError, export_model, output_differences  # noqa
from .wrapper import (  # noqa: F401
    INSTANCE_FIELDS,
    TRACEABLE_OUTPUTS,
    UNTRACEABLE_OUTPUTS,
    ExportWrapper,
    check_output_names,
    flatten_outputs,
    inline_autograd_functions,
    reference_ops,
)
