"""Tests of safe checkpoint loading (seg_methods.utils.checkpoint) and the weight converters."""

import collections
import io
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from seg_methods.modeling.backbone.swin import D2SwinTransformer
from seg_methods.utils.checkpoint import (
    CheckpointMismatchError,
    CheckpointSecurityError,
    SegCheckpointer,
    load_checkpoint_file,
    restricted_pickle_load,
)
from repo_scripts import load_script

SIDE_EFFECTS = []


def load_tool(name):
    return load_script(f"tools/{name}.py")


class TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, classes)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1), persistent=True)


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_unpickler_accepts_numpy_weights(protocol):
    data = {
        "model": collections.OrderedDict(
            w=np.arange(6, dtype=np.float32).reshape(2, 3),
            f=np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            e=np.zeros(0, dtype=np.float16),
            i=np.array([1, -2], dtype=np.int64),
        ),
        "__author__": "someone",
        "matching_heuristics": True,
        "extra": (
            1,
            2.5,
            None,
            False,
            b"",
            b"\x00\xff",
            "text",
            1 + 2j,
            np.float32(1.5),
            np.int64(7),
        ),
    }
    out = restricted_pickle_load(io.BytesIO(pickle.dumps(data, protocol=protocol)))
    assert isinstance(out["model"], collections.OrderedDict)
    for k, v in data["model"].items():
        assert out["model"][k].dtype == v.dtype and np.array_equal(out["model"][k], v)
    assert out["extra"] == data["extra"]
    assert out["__author__"] == "someone" and out["matching_heuristics"] is True


def test_unpickler_accepts_plain_pickled_tensors():
    # The official Mask2Former Swin converter pickles torch tensors with plain pickle.
    w = torch.arange(12.0).reshape(3, 4)[:, 1:]  # non-contiguous view
    blob = pickle.dumps({"model": {"w": w, "h": torch.ones(2, dtype=torch.float16)}}, protocol=4)
    out = restricted_pickle_load(io.BytesIO(blob))
    assert torch.equal(out["model"]["w"], w) and out["model"]["h"].dtype == torch.float16


class _SystemCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Custom:
    def __setstate__(self, state):
        SIDE_EFFECTS.append(state)


def test_unpickler_refuses_os_system_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _SystemCall(marker)}))
    with pytest.raises(CheckpointSecurityError) as err:
        load_checkpoint_file(str(path))
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_unpickler_refuses_custom_class_and_builtins(tmp_path):
    obj = _Custom()
    obj.__dict__["payload"] = 1
    path = tmp_path / "custom.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "obj": obj}, protocol=2))
    with pytest.raises(CheckpointSecurityError, match=r"_Custom") as err:
        load_checkpoint_file(str(path))
    assert "custom.pkl" in str(err.value)
    assert SIDE_EFFECTS == []
    # A hand-written pickle calling builtins.eval.
    evil = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(CheckpointSecurityError, match="builtins.eval"):
        restricted_pickle_load(io.BytesIO(evil), source="hand.pkl")
    # _codecs.encode is allowed only for latin-1 bytes.
    evil = b"c_codecs\nencode\n(X\x02\x00\x00\x00abX\x06\x00\x00\x00base64tR."
    with pytest.raises(CheckpointSecurityError, match="latin-1"):
        restricted_pickle_load(io.BytesIO(evil))


def test_pth_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "obj": _Custom()}, str(path))
    with pytest.raises(CheckpointSecurityError, match="weights_only"):
        load_checkpoint_file(str(path))
    assert SIDE_EFFECTS == []
    # numpy arrays inside a torch.save file are fine.
    good = tmp_path / "np.pth"
    torch.save({"model": {"w": np.ones(3, np.float32)}}, str(good))
    assert np.array_equal(load_checkpoint_file(str(good))["model"]["w"], np.ones(3))


# ---------------------------------------------------------------------------------------------
# SegCheckpointer
# ---------------------------------------------------------------------------------------------
def test_round_trip_pkl(tmp_path):
    src = TinyNet()
    path = tmp_path / "tiny.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": numpy_state(src), "__author__": "test"}, f)
    dst = TinyNet()
    SegCheckpointer(dst, strict=True).load(str(path))
    assert_same_state(src, dst)


def test_round_trip_pth_with_optimizer(tmp_path):
    src = TinyNet()
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src.head(torch.randn(2, 4)).sum().backward()
    opt.step()
    SegCheckpointer(src, str(tmp_path), optimizer=opt).save("model_0000007", iteration=7)
    dst = TinyNet()
    opt2 = torch.optim.SGD(dst.parameters(), lr=0.1, momentum=0.9)
    extra = SegCheckpointer(dst, str(tmp_path), strict=True, optimizer=opt2).resume_or_load("")
    assert extra["iteration"] == 7
    assert_same_state(src, dst)
    assert torch.equal(
        opt2.state_dict()["state"][4]["momentum_buffer"],
        opt.state_dict()["state"][4]["momentum_buffer"],
    )


def test_shape_mismatch_raises_and_loads_nothing(tmp_path):
    src = TinyNet(classes=5)
    path = tmp_path / "five.pth"
    torch.save({"model": src.state_dict()}, str(path))
    dst = TinyNet(classes=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        SegCheckpointer(dst).load(str(path))
    msg = str(err.value)
    assert "head.weight: (5, 4) in checkpoint, (3, 4) in model" in msg
    assert "head.bias: (5,) in checkpoint, (3,) in model" in msg
    assert "conv.weight" not in msg and str(path) in msg
    assert [k for k, _, _ in err.value.incorrect_shapes] == ["head.weight", "head.bias"]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was copied
    # Allowed on purpose: the head is skipped, the rest loads.
    SegCheckpointer(dst, allowed_shape_mismatch=[r"^head\."]).load(str(path))
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert torch.equal(dst.head.weight, before["head.weight"])


def test_strict_missing_keys(tmp_path):
    src = TinyNet()
    state = numpy_state(src)
    del state["head.weight"], state["norm.running_var"], state["pixel_mean"]
    path = tmp_path / "partial.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    dst = TinyNet()
    with pytest.raises(CheckpointMismatchError) as err:
        SegCheckpointer(dst, strict=True).load(str(path))
    # pixel_mean comes from the config and is never required (as in detectron2).
    assert err.value.missing_keys == ["head.weight", "norm.running_var"]
    assert "head.weight" in str(err.value) and "strict" in str(err.value)
    assert not torch.equal(dst.conv.weight, src.conv.weight)
    # Non-strict (fine-tuning): loads what is there, the rest stays.
    ckpt = SegCheckpointer(dst, strict=True)
    ckpt.load(str(path), strict=False)
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not torch.equal(dst.head.weight, src.head.weight)


def test_unexpected_keys_are_logged_not_raised(tmp_path):
    src = TinyNet()
    state = numpy_state(src)
    state["extra.weight"] = np.zeros(2, np.float32)
    path = tmp_path / "extra.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    dst = TinyNet()
    SegCheckpointer(dst, strict=True).load(str(path))
    assert_same_state(src, dst)


# ---------------------------------------------------------------------------------------------
# ImageNet Swin weights with matching heuristics, and the converters
# ---------------------------------------------------------------------------------------------
TINY = dict(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], drop_path_rate=0.0)


class SegModel(nn.Module):
    """Backbone plus a head with a LayerNorm named like the classifier's final norm."""

    def __init__(self, window_size=4):
        super().__init__()
        self.backbone = D2SwinTransformer(**TINY, window_size=window_size)
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.norm = nn.LayerNorm(16)
        self.sem_seg_head.proj = nn.Linear(16, 16)


def imagenet_swin_pth(path, window_size=4):
    """A fake official Swin ImageNet .pth: backbone names without prefix, a classifier, the
    final norm and attn_mask buffers."""
    swin = D2SwinTransformer(**TINY, window_size=window_size)
    state = {
        k: v
        for k, v in swin.state_dict().items()
        if not k.startswith(("norm0", "norm1", "norm2", "norm3"))
    }
    state["norm.weight"], state["norm.bias"] = torch.randn(192), torch.randn(192)
    state["head.weight"], state["head.bias"] = torch.randn(10, 192), torch.randn(10)
    state["layers.2.blocks.1.attn_mask"] = torch.zeros(1, 16, 16)
    torch.save({"model": state}, str(path))
    return state


def test_swin_imagenet_converter_and_heuristic_loading(tmp_path, capsys):
    state = imagenet_swin_pth(tmp_path / "swin.pth")
    tool = load_tool("convert_swin_imagenet_to_d2")
    assert tool.main([str(tmp_path / "swin.pth"), str(tmp_path / "swin.pkl")]) == 0
    printed = capsys.readouterr().out
    assert "MODEL.SWIN.EMBED_DIM=24" in printed and "DEPTHS=[1, 1, 2, 1]" in printed
    assert "NUM_HEADS=[1, 2, 2, 4]" in printed and "WINDOW_SIZE=4" in printed

    data = load_checkpoint_file(str(tmp_path / "swin.pkl"))
    assert data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert "head.weight" not in data["model"] and "norm.weight" not in data["model"]
    assert "layers.2.blocks.1.attn_mask" not in data["model"]

    model = SegModel()
    head_norm = model.sem_seg_head.norm.weight.detach().clone()
    SegCheckpointer(model).load(str(tmp_path / "swin.pkl"))
    for k, v in state.items():
        if "backbone." + k in model.state_dict():
            assert torch.equal(model.state_dict()["backbone." + k], v), k
    assert torch.equal(model.sem_seg_head.norm.weight, head_norm)

    # With --keep-all, "norm.weight" (192) is a stray suffix match of sem_seg_head.norm.weight
    # (16): tolerated, as in detectron2.
    assert tool.main([str(tmp_path / "swin.pth"), str(tmp_path / "all.pkl"), "--keep-all"]) == 0
    SegCheckpointer(SegModel()).load(str(tmp_path / "all.pkl"))


def test_heuristic_window_size_mismatch_raises(tmp_path):
    imagenet_swin_pth(tmp_path / "w5.pth", window_size=5)
    tool = load_tool("convert_swin_imagenet_to_d2")
    assert tool.main([str(tmp_path / "w5.pth"), str(tmp_path / "w5.pkl")]) == 0
    with pytest.raises(CheckpointMismatchError) as err:
        SegCheckpointer(SegModel(window_size=4)).load(str(tmp_path / "w5.pkl"))
    msg = str(err.value)
    assert (
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table (checkpoint: "
        "layers.0.blocks.0.attn.relative_position_bias_table): "
        "(81, 1) in checkpoint, (49, 1) in model"
    ) in msg
    assert len(err.value.incorrect_shapes) == 10  # bias table and index of 5 blocks


def official_like_mask2former_pkl(path, model):
    with open(path, "wb") as f:
        pickle.dump({"model": numpy_state(model), "__author__": "FAIR"}, f)


def test_mask2former_converter(tmp_path, capsys):
    src = SegModel()
    official_like_mask2former_pkl(tmp_path / "m2f.pkl", src)
    tool = load_tool("convert_mask2former_weights")
    assert tool.main([str(tmp_path / "m2f.pkl"), str(tmp_path / "m2f.pth")]) == 0
    out = capsys.readouterr().out
    n = len(src.state_dict())
    assert f"{n} tensors" in out and "0 unexpected keys" in out
    # Both the converted .pth and the official .pkl load strictly.
    for name in ("m2f.pth", "m2f.pkl"):
        dst = SegModel()
        SegCheckpointer(dst, strict=True).load(str(tmp_path / name))
        assert_same_state(src, dst)
    # Keys outside the known modules are reported.
    state = numpy_state(src)
    state["stray.weight"] = np.zeros(1, np.float32)
    with open(tmp_path / "stray.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "x"}, f)
    assert tool.main([str(tmp_path / "stray.pkl"), str(tmp_path / "stray.pth")]) == 0
    assert "unexpected: stray.weight" in capsys.readouterr().out
    # Key/shape comparison with a model.
    missing, unexpected, mismatched = tool.compare_with_model(
        tool.convert(state)[0], SegModel(window_size=5)
    )
    assert unexpected == ["stray.weight"] and missing == []
    assert (
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
        (49, 1),
        (81, 1),
    ) in mismatched
    # The documented usage, --config-file after IN OUT and overrides after it, runs the check
    # (an argparse REMAINDER once swallowed --config-file into the overrides).
    quick = os.path.join(
        os.path.dirname(__file__), "..", "..", "configs", "quick_schedules",
        "mask2former_synthetic_panoptic_instant_test.yaml",
    )  # fmt: skip
    tool.main([str(tmp_path / "m2f.pkl"), str(tmp_path / "q.pth"), "--config-file", quick,
               "MODEL.DEVICE", "cpu"])  # fmt: skip
    assert f"against {quick}:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Truncated files, missing files, NaN weights in the converters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pkl", "legacy.pth", "zip.pth"])
@pytest.mark.parametrize("cut", [0, 7, 0.5, -3])
def test_truncated_files_raise_a_read_error_naming_them(fmt, cut, tmp_path):
    from seg_methods.utils.checkpoint import CheckpointReadError

    model = TinyNet()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pkl":
        path.write_bytes(pickle.dumps({"model": numpy_state(model), "__author__": "x"}))
    else:
        torch.save(
            {"model": model.state_dict()},
            str(path),
            _use_new_zipfile_serialization=fmt == "zip.pth",
        )
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointReadError, match="truncated, corrupt or not a checkpoint") as e:
        load_checkpoint_file(str(path))
    assert e.value.path == str(path) and str(path) in str(e.value)
    # the checkpointer can be used again after a failed load (detectron2 leaves state behind)
    ckpt = SegCheckpointer(TinyNet(), strict=True)
    with pytest.raises(CheckpointReadError):
        ckpt.load(str(path))
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, str(good))
    ckpt.load(str(good))


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth.*MODEL.WEIGHTS"):
        SegCheckpointer(TinyNet()).load(str(tmp_path / "nope.pth"))
    SegCheckpointer(TinyNet()).load("")  # empty: nothing to load, as detectron2


def test_earlier_checkpoints_newest_first(tmp_path):
    for name in ["model_0000009.pth", "model_0000019.pth", "model_final.pth", "other.pth", "x"]:
        (tmp_path / name).write_bytes(b"")
    ckpt = SegCheckpointer(TinyNet(), str(tmp_path))
    d = str(tmp_path)
    final = os.path.join(d, "model_final.pth")
    assert ckpt.earlier_checkpoints(final) == [
        os.path.join(d, "model_0000019.pth"),
        os.path.join(d, "model_0000009.pth"),
    ]
    assert ckpt.earlier_checkpoints(os.path.join(d, "model_0000019.pth")) == [
        os.path.join(d, "model_0000009.pth")
    ]
    assert ckpt.earlier_checkpoints(os.path.join(d, "model_0000009.pth")) == []


def test_converters_refuse_non_finite_weights(tmp_path):
    from seg_methods.utils.checkpoint import NonFiniteWeightsError

    state = imagenet_swin_pth(tmp_path / "ok.pth")
    key = "patch_embed.proj.weight"
    bad = {k: torch.as_tensor(v).clone() for k, v in state.items()}
    bad[key].view(-1)[0] = float("nan")
    torch.save({"model": bad}, str(tmp_path / "nan.pth"))
    swin = load_tool("convert_swin_imagenet_to_d2")
    with pytest.raises(NonFiniteWeightsError, match=f"nan.pth.*\n.*{key} \\(1 of "):
        swin.main([str(tmp_path / "nan.pth"), str(tmp_path / "out.pkl")])
    m2f = load_tool("convert_mask2former_weights")
    with pytest.raises(NonFiniteWeightsError, match=key):
        m2f.main([str(tmp_path / "nan.pth"), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pkl").exists() and not (tmp_path / "out.pth").exists()
