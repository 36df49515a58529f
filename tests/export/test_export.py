"""Export (seg_methods.export, tools/export_model.py, demo/deploy_torchscript.py) on the CPU.

* The traced graph calls the compiled ops through ``torch.ops.seg_methods`` (Mask2Former's
  deformable attention, the clustering op of ClustSeg / CMT-DeepLab), and the PyTorch
  reference when the op is not requested; the autograd wrappers are restored afterwards.
* Outputs that tracing would bake in are refused (panoptic) or caught by the verification on a
  second image (instances filtered by a Python list when panoptic inference is on).
* The tool exports a model and the deploy example runs it in a process without seg_methods,
  writing a picture.
* ONNX through the PyTorch reference ops (skipped when ``onnx`` is not installed).

The per-architecture "exported equals eager" check is in tests/modeling/test_model_e2e.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import seg_methods  # noqa: F401
from seg_methods.config import get_cfg
from seg_methods.export import (
    ExportVerificationError,
    check_output_names,
    export_model,
    inline_autograd_functions,
    reference_ops,
)
from seg_methods.utils.ext import has_op

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(REPO, "configs", "quick_schedules")
M2F = os.path.join(QUICK, "mask2former_synthetic_panoptic_instant_test.yaml")
CLUSTSEG = os.path.join(QUICK, "clustseg_synthetic_panoptic_instant_test.yaml")
SIZE = (45, 62)


TORCH_THREADS = 1  # one intra-op thread for this module (tests/conftest.py)


def _model(path, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.skipif(not has_op("ms_deform_attn_forward"), reason="seg_methods._C not built")
def test_mask2former_trace_calls_the_deformable_attention_op(tmp_path):
    cfg, model = _model(M2F)
    result = export_model(cfg, model, "torchscript", str(tmp_path), image_size=SIZE)
    print(f"\nMask2Former op path: max |TorchScript - eager| {result.max_abs_diff}")
    assert "seg_methods::ms_deform_attn_forward" in result.ops
    assert all(d == 0.0 for per in result.max_abs_diff.values() for d in per.values())
    # the metadata is embedded in the TorchScript file and written next to it
    extra = {"seg_methods_export.json": ""}
    torch.jit.load(result.path, _extra_files=extra)
    meta = json.loads(extra["seg_methods_export.json"])
    assert meta["outputs"] == ["sem_seg"] and meta["input"]["shape"] == [3, *SIZE]
    assert meta == json.load(open(result.metadata_path))
    # the autograd wrappers are back: training still differentiates through the op
    from seg_methods.layers.ms_deform_attn import _MSDeformAttnFunction

    assert "apply" not in _MSDeformAttnFunction.__dict__


def test_mask2former_reference_path_has_no_compiled_op(tmp_path):
    cfg, model = _model(M2F)
    result = export_model(
        cfg, model, "torchscript", str(tmp_path), image_size=SIZE, reference_ops_only=True
    )
    assert result.ops == []
    assert max(d for per in result.max_abs_diff.values() for d in per.values()) <= 1e-5
    graph = torch.jit.load(result.path).inlined_graph
    assert "aten::grid_sampler" in {n.kind() for n in graph.nodes()}


@pytest.mark.skipif(not has_op("soft_cluster_forward"), reason="seg_methods._C not built")
def test_clustseg_trace_calls_the_clustering_op(tmp_path):
    cfg, model = _model(CLUSTSEG)
    result = export_model(cfg, model, "torchscript", str(tmp_path), image_size=SIZE)
    assert "seg_methods::soft_cluster_forward" in result.ops
    assert max(d for per in result.max_abs_diff.values() for d in per.values()) <= 1e-5


def test_output_names_refuse_what_tracing_bakes_in():
    available = ["sem_seg", "panoptic_seg", "instances"]
    assert check_output_names(["sem_seg", "instances"], available) == [
        "sem_seg",
        "instances.pred_masks",
        "instances.scores",
        "instances.pred_classes",
    ]
    with pytest.raises(ValueError, match="panoptic_seg.*cannot be exported"):
        check_output_names(["panoptic_seg"], available)
    with pytest.raises(ValueError, match="returns only"):
        check_output_names(["superpixels"], available)
    with pytest.raises(ValueError, match="unknown output"):
        check_output_names(["depth"], available)


def test_instances_verified_on_a_second_image(tmp_path):
    # With panoptic inference on, stuff instances are removed by a Python list of the top-k
    # labels: the trace bakes it in, and the check on the second image catches it.
    cfg, model = _model(M2F)
    with pytest.raises(ExportVerificationError, match="check_image/instances"):
        export_model(cfg, model, "torchscript", str(tmp_path / "a"), image_size=SIZE,
                     outputs=["instances"], reference_ops_only=True)  # fmt: skip
    # Without panoptic inference the instance path is pure tensor code and matches.
    cfg, model = _model(M2F, "TEST.PANOPTIC_ON", False)
    result = export_model(cfg, model, "torchscript", str(tmp_path / "b"), image_size=SIZE,
                          outputs=["instances"], reference_ops_only=True)  # fmt: skip
    print(f"\ninstances without panoptic: {result.max_abs_diff}")
    assert result.output_names == [
        "instances.pred_masks",
        "instances.scores",
        "instances.pred_classes",
    ]


def test_context_managers_restore_state():
    from seg_methods.utils import ext

    before = ext.load_extension()
    with reference_ops():
        assert not has_op("ms_deform_attn_forward")
    assert ext.load_extension() is before
    with pytest.raises(RuntimeError, match="no_grad"):
        with inline_autograd_functions():
            pass


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "export_model_tool", os.path.join(REPO, "tools", "export_model.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw
    )


@pytest.mark.skipif(not has_op("ms_deform_attn_forward"), reason="seg_methods._C not built")
def test_export_tool_then_deploy_in_a_process_without_seg_methods(tmp_path, capsys):
    image = np.random.RandomState(0).randint(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "exported"
    tool = _load_tool()
    result = tool.main(
        [
            "--config-file", M2F,
            "--format", "torchscript",
            "--output", str(out),
            "--sample-image", str(tmp_path / "in.png"),
            "--random-weights",
        ]
    )  # fmt: skip
    assert "max |exported - eager| on the check image" in capsys.readouterr().out
    assert result.max_abs_diff["check_image"]["sem_seg"] <= 1e-4
    meta = json.load(open(out / "seg_methods_export.json"))
    assert meta["input"]["shape"] == [3, 64, 82]  # resized as at test time (short edge 64)
    assert any(n.startswith("_C") and n.endswith(".so") for n in os.listdir(out))
    # random weights are refused unless asked for
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS is empty"):
        tool.main(["--config-file", M2F, "--format", "torchscript", "--output", str(tmp_path)])

    picture = tmp_path / "deployed.png"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['deploy', '--model', {str(out)!r}, '--input', {str(tmp_path / 'in.png')!r},"
        f" '--output', {str(picture)!r}]\n"
        "runpy.run_path('demo/deploy_torchscript.py', run_name='__main__')\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & "
        "{'seg_methods', 'detectron2'}))\n"
    )
    r3 = _run(["-c", probe])
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "LOADED []" in r3.stdout, r3.stdout
    drawn = np.asarray(Image.open(picture))
    assert drawn.shape == (70, 90, 3) and not np.array_equal(drawn, image)


def test_onnx_export_through_the_reference_ops(tmp_path):
    pytest.importorskip("onnx")
    cfg, model = _model(M2F)  # DEFORM_ATTN_IMPL "auto": exported through the reference
    result = export_model(cfg, model, "onnx", str(tmp_path), image_size=SIZE)
    import onnx

    graph = onnx.load(result.path).graph
    assert "GridSample" in {n.op_type for n in graph.node}
    assert [o.name for o in graph.output] == ["sem_seg"]
    if result.verified:  # onnxruntime installed
        print(f"\nONNX: max |onnxruntime - eager| {result.max_abs_diff}")
        assert max(d for per in result.max_abs_diff.values() for d in per.values()) <= 1e-4
