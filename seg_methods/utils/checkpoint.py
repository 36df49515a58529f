"""Safe checkpoint loading: a restricted unpickler for ``.pkl`` files and ``SegCheckpointer``.

Public model zoos ship two kinds of files:

- ``.pkl``: plain pickles in detectron2's format, ``{"model": {name: numpy array}, "__author__":
  ..., "matching_heuristics": ...}`` (Mask2Former model zoo, converted ImageNet backbones such as
  ``R-50.pkl``), or the older Caffe2/Detectron format (``{"blobs": {...}}`` or a flat dict).
  ``pickle.load`` runs whatever callable the file names, so these are read with
  :class:`RestrictedUnpickler`, which only rebuilds plain containers, numbers, strings, bytes and
  numpy arrays and refuses every other global with an error naming it and the file.
- ``.pth`` (and ``.pyth``): ``torch.save`` files, read with ``torch.load(weights_only=True)``.

:class:`SegCheckpointer` is detectron2's ``DetectionCheckpointer`` with these loaders, and with
checks detectron2 does not make: it raises :class:`CheckpointMismatchError` *before touching the
model* when a checkpoint tensor has another shape than the model's tensor of the same name
(detectron2 only logs and skips it), and, when loading strictly, when model keys are missing.

Choosing strictness (a caller decides; there is no config key):

- ``SegCheckpointer(model, save_dir)`` -- training and fine-tuning (the default, ``strict=False``):
  missing and unexpected keys are logged as detectron2 does, since starting from an ImageNet
  backbone legitimately leaves every head key missing. Shape mismatches raise.
- ``SegCheckpointer(model, save_dir, strict=True)`` -- evaluation (``--eval-only``) and inference:
  missing model keys raise too, because they would silently stay randomly initialised.
  Unexpected checkpoint keys are only logged (they cannot change the model's outputs).
- ``checkpointer.load(path, strict=...)`` overrides the constructor's choice for one call.
- ``allowed_shape_mismatch=[regex, ...]``: model keys matching one of the regular expressions
  (``re.search``) may differ in shape; they are skipped with a warning instead of raising, e.g.
  ``[r"predictor\\.class_embed\\."]`` to fine-tune a COCO model on a dataset with other classes.

With ``matching_heuristics`` (ImageNet backbones), names are aligned by detectron2's suffix
matching. A shape mismatch then raises only for pairs aligned through the dominant prefix (e.g.
``backbone.`` + the checkpoint name) or with identical names; a short checkpoint name that
happens to be the suffix of an unrelated head key (e.g. a classifier's ``norm.weight``) is a
spurious candidate that detectron2 logs and skips, as before.

Every file read here is also checked for NaN/Inf weights (:class:`NonFiniteWeightsError` names
the tensors), and a truncated or corrupt file raises :class:`CheckpointReadError` naming it.

Resuming (``resume_or_load(..., resume=True)`` with a ``last_checkpoint`` in ``save_dir``) loads
the last checkpoint *exactly*: a missing or unexpected model key, or another shape, raises
:class:`CheckpointMismatchError` (the folder holds another model's checkpoints). When the last
checkpoint cannot be read (truncated by a crash while saving), the error names the newest
earlier ``model_XXXXXXX.pth`` of the folder and how to resume from it; with
``resume_fallback=True`` (``train_net.py --resume-fallback``) the checkpointer falls back to it
automatically, with a warning.

Other loaders. ``import seg_methods`` calls :func:`install_safe_loaders`, which routes the file
reading of detectron2's ``DetectionCheckpointer`` (used by ``DefaultPredictor``,
``DefaultTrainer`` and ``model_zoo``) and of fvcore's ``Checkpointer`` through the same safe
readers, so that a weights file is never read with plain ``pickle`` or
``torch.load(weights_only=False)`` in a process that imported seg_methods.
"""

import codecs
import collections
import io
import logging
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from typing import IO, Any, Dict, List, Optional, Sequence, Set, Tuple, Union
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import (
    align_and_update_state_dicts,
    convert_c2_detectron_names,
)
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

__all__ = [
    "CheckpointSecurityError",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "NonFiniteWeightsError",
    "RandomWeightsError",
    "check_finite_weights",
    "require_weights",
    "install_safe_loaders",
    "safe_loaders_installed",
    "RestrictedUnpickler",
    "restricted_pickle_load",
    "torch_load_weights_only",
    "load_checkpoint_file",
    "strip_common_prefix",
    "save_converted_checkpoint",
    "SegCheckpointer",
]

logger = logging.getLogger(__name__)

# numpy 2 renamed numpy.core to numpy._core (the old name warns); use whichever is native.
_np_core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core


class CheckpointSecurityError(pickle.UnpicklingError):
    """A pickle asked for a global (class or function) outside the allow-list."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model (shape mismatches, or missing keys when strict).

    Attributes:
        incorrect_shapes (list[tuple[str, tuple, tuple]]): (model key, checkpoint shape,
            model shape) for each shape mismatch.
        missing_keys (list[str]): model keys absent from the checkpoint (strict loading only).
        unexpected_keys (list[str]): checkpoint keys the model lacks (exact loading, i.e.
            resuming, only).
    """

    def __init__(self, message: str, incorrect_shapes=(), missing_keys=(), unexpected_keys=()):
        super().__init__(message)
        self.incorrect_shapes = list(incorrect_shapes)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read: truncated, corrupt or not a checkpoint.

    Attributes:
        path (str): the file.
        earlier (list[str]): for a resume, readable-looking earlier checkpoints of the same
            folder (newest first); empty otherwise.
    """

    def __init__(self, message: str, path: str = "", earlier: Sequence[str] = ()):
        super().__init__(message)
        self.path = path
        self.earlier = list(earlier)


class NonFiniteWeightsError(ValueError):
    """A checkpoint holds weights with NaN or Inf values.

    Attributes:
        names (list[str]): the checkpoint keys of the non-finite tensors.
    """

    def __init__(self, message: str, names: Sequence[str] = ()):
        super().__init__(message)
        self.names = list(names)


class RandomWeightsError(ValueError):
    """Evaluation or inference was asked for without weights (it would use random ones)."""


# --------------------------------------------------------------------------------------------
# Restricted unpickler
# --------------------------------------------------------------------------------------------
def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocols 0-2 store ``bytes`` as ``_codecs.encode(text, "latin1")``; allow only that use.
    normalized = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(obj, str) or normalized not in ("latin1", "iso88591", "l1"):
        raise CheckpointSecurityError(
            f"_codecs.encode is only allowed on text with the latin-1 codec, got {encoding!r}"
        )
    return codecs.encode(obj, encoding, errors)


def _safe_bytes(*args):
    # Protocols 0-2 store ``b""`` as ``bytes()``; refuse ``bytes(n)`` (allocation by count).
    if args and not isinstance(args[0], (bytes, str)):
        raise CheckpointSecurityError("bytes() is only allowed without arguments or on text")
    return bytes(*args)


def _safe_reconstruct(subtype, shape, dtype):
    # numpy's array pickles call ``_reconstruct(numpy.ndarray, (0,), b"b")`` then ``__setstate__``.
    if subtype is not np.ndarray:
        raise CheckpointSecurityError(
            f"numpy _reconstruct is only allowed for ndarray, got {subtype}"
        )
    return _np_core.multiarray._reconstruct(subtype, shape, dtype)


def _safe_torch_storage_from_bytes(data: bytes):
    # ``pickle.dumps(tensor)`` embeds each storage as a ``torch.save`` blob rebuilt by
    # ``torch.storage._load_from_bytes``, which loads it with ``weights_only=False``. The Swin
    # converter of the official Mask2Former release writes such pickles; we rebuild the storage
    # with torch's own restricted (weights-only) loader instead.
    if not isinstance(data, bytes):
        raise CheckpointSecurityError("torch storage blobs must be bytes")
    return torch_load_weights_only(io.BytesIO(data), source="<tensor storage in a pickle>")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    table: Dict[Tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    for mod in ("builtins", "__builtin__"):  # "__builtin__": Python-2 and protocol < 3 pickles
        table[(mod, "complex")] = complex
        table[(mod, "bytes")] = _safe_bytes
    table[("_codecs", "encode")] = _safe_codecs_encode
    # numpy 1.x pickles name numpy.core.*, numpy 2.x pickles name numpy._core.*.
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _safe_reconstruct
        table[(f"{core}.multiarray", "scalar")] = _np_core.multiarray.scalar  # numpy scalars
        table[(f"{core}.numeric", "_frombuffer")] = _np_core.numeric._frombuffer  # protocol 5
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    # Tensors pickled with plain ``pickle`` (not torch.save).
    table[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
    table[("torch._utils", "_rebuild_parameter")] = torch._utils._rebuild_parameter
    table[("torch.storage", "_load_from_bytes")] = _safe_torch_storage_from_bytes
    return table


_ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only plain data and numpy arrays.

    Allowed: dict, list, tuple, str, bytes, int, float, complex, bool, None (these need no
    global), ``collections.OrderedDict``, numpy arrays, dtypes and scalars (the globals numpy
    1.x/2.x pickles name: ``numpy.core.multiarray._reconstruct``/``scalar``, ``numpy.ndarray``,
    ``numpy.dtype``, ``numpy.core.numeric._frombuffer`` for protocol 5, and their
    ``numpy._core`` spellings), the ``_codecs.encode``/``bytes`` forms protocols 0-2 use for
    bytes, and torch tensors pickled with plain pickle (their storages are rebuilt with
    ``torch.load(weights_only=True)``). Any other global raises :class:`CheckpointSecurityError`
    before anything from the file is called.
    """

    def __init__(self, file: IO[bytes], *, source: str = "<stream>", encoding: str = "latin1"):
        """
        Args:
            file (file-like): binary stream positioned at the pickle.
            source (str): name used in error messages (usually the file path).
            encoding (str): how Python-2 ``str`` objects are decoded; latin-1 keeps numpy
                array buffers of Python-2 pickles (Caffe2 model zoo) intact.
        """
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointSecurityError(
                f"Refusing to load '{self.source}': it references the global "
                f"'{module}.{name}', which is not allowed in a weights file (only containers, "
                "numbers, strings, bytes, numpy arrays and tensors are). If you trust the file, "
                "re-save its state dict as numpy arrays or with torch.save."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointSecurityError(
            f"Refusing to load '{self.source}': it uses pickle persistent ids ({pid!r}); "
            "torch.save files must use a .pth extension."
        )


def restricted_pickle_load(file: IO[bytes], *, source: str = "<stream>") -> Any:
    """Unpickle a stream with :class:`RestrictedUnpickler`.

    Args:
        file (file-like): binary stream.
        source (str): name used in error messages.

    Returns:
        The unpickled object (built from allowed types only).
    """
    return RestrictedUnpickler(file, source=source).load()


def _numpy_safe_globals() -> List[Any]:
    # Globals a ``torch.save`` file holding numpy arrays needs under ``weights_only=True``.
    items = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, _np_core.multiarray.scalar]
    dtypes_mod = getattr(np, "dtypes", None)
    if dtypes_mod is not None:
        for tname in (
            "Float16DType Float32DType Float64DType Int8DType Int16DType Int32DType "
            "Int64DType UInt8DType UInt16DType UInt32DType UInt64DType BoolDType"
        ).split():
            if hasattr(dtypes_mod, tname):
                items.append(getattr(dtypes_mod, tname))
    return items


def _unreadable(source: str, error: BaseException) -> CheckpointReadError:
    return CheckpointReadError(
        f"Cannot read checkpoint '{source}': the file is truncated, corrupt or not a checkpoint "
        f"({type(error).__name__}: {error})",
        path=source,
    )


# What reading a truncated or corrupt file raises (torch's zip reader: RuntimeError, OSError;
# legacy torch files and pickles: EOFError, UnpicklingError; numpy buffers: ValueError).
_CORRUPT_FILE_ERRORS = (
    EOFError,
    RuntimeError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    struct.error,
)
# OSErrors that are about the path, not the content: re-raised as they are.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def torch_load_weights_only(f: Union[str, IO[bytes]], *, source: Optional[str] = None) -> Any:
    """``torch.load(f, weights_only=True)`` on the CPU, also accepting numpy arrays.

    ``weights_only=True`` is passed explicitly, so that ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    (which only changes torch's default) cannot turn it off.

    Args:
        f (str or file-like): path or binary stream.
        source (str): name used in error messages (default: ``f`` if it is a path).

    Returns:
        The loaded object.

    Raises:
        CheckpointSecurityError: the file needs globals torch's weights-only loader refuses.
        CheckpointReadError: the file is truncated or corrupt.
    """
    source = source or (f if isinstance(f, str) else "<stream>")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointSecurityError(
                f"Refusing to load '{source}' with torch.load(weights_only=True): {e}"
            ) from e
        raise _unreadable(source, e) from e
    except _PATH_ERRORS:
        raise
    except _CORRUPT_FILE_ERRORS as e:
        raise _unreadable(source, e) from e


def check_finite_weights(state: Dict[str, Any], source: str, limit: int = 20) -> None:
    """Raise if a floating-point tensor or array of ``state`` holds NaN or Inf.

    Args:
        state (dict): name -> Tensor or ndarray (other values are ignored).
        source (str): the file, for the message.
        limit (int): at most this many names are listed in the message.

    Raises:
        NonFiniteWeightsError: naming every non-finite tensor (and how many values are bad).
    """
    bad = []  # (name, non-finite count, numel)
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                finite = torch.isfinite(value)
                if not bool(finite.all()):
                    bad.append((name, int((~finite).sum()), value.numel()))
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fc":
            finite = np.isfinite(value)
            if not finite.all():
                bad.append((name, int((~finite).sum()), value.size))
    if bad:
        lines = [f"{n} ({k} of {total} values)" for n, k, total in bad]
        raise NonFiniteWeightsError(
            f"Refusing to load '{source}': {len(bad)} tensor(s) contain NaN or Inf values:\n"
            + _format_key_list(lines, limit)
            + "\n  Such weights come from a diverged training run; use an earlier checkpoint.",
            names=[n for n, _, _ in bad],
        )


def _from_pickle_payload(data: Any, source: str) -> Dict[str, Any]:
    # detectron2's interpretation of a .pkl payload (DetectionCheckpointer._load_file), plus:
    # a dict whose "model" entry is a dict is taken as detectron2 format even without
    # "__author__" (detectron2 would treat the whole dict as a Caffe2 blob dict).
    if not isinstance(data, dict):
        raise ValueError(f"'{source}' holds a {type(data).__name__}, expected a dict of weights")
    if isinstance(data.get("model"), dict):
        if "__author__" in data:
            logger.info("Reading a file from '{}'".format(data["__author__"]))
        return data
    if "blobs" in data:  # Caffe2 detection models keep weights under "blobs"
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def load_checkpoint_file(path: str, *, check_finite: bool = True) -> Dict[str, Any]:
    """Read a checkpoint file safely into detectron2's checkpoint format.

    ``.pkl``: restricted unpickler; ``.pyth`` (pycls): weights-only ``torch.load`` of
    ``model_state``; anything else: weights-only ``torch.load``.

    Args:
        path (str): local path or any path detectron2's ``PathManager`` can open.
        check_finite (bool): refuse weights with NaN/Inf values (:func:`check_finite_weights`).

    Returns:
        dict: ``{"model": {name: ndarray or Tensor}, ...}`` plus whatever else the file held
        (``"__author__"``, ``"matching_heuristics"``, optimizer state, ...).

    Raises:
        CheckpointSecurityError: the file needs code outside the allow-list to load.
        CheckpointReadError: the file is truncated or corrupt.
        NonFiniteWeightsError: ``check_finite`` and some weights are NaN or Inf.
    """
    if path.endswith(".pkl"):
        with PathManager.open(path, "rb") as f:
            try:
                payload = restricted_pickle_load(f, source=path)
            except CheckpointSecurityError as e:
                if path in str(e):
                    raise
                # raised for a tensor storage nested in the pickle: name the file too
                raise CheckpointSecurityError(f"Refusing to load '{path}': {e}") from e
            except _PATH_ERRORS:
                raise
            except _CORRUPT_FILE_ERRORS + (ValueError,) as e:
                raise _unreadable(path, e) from e
        data = _from_pickle_payload(payload, path)
    else:
        with PathManager.open(path, "rb") as f:
            loaded = torch_load_weights_only(f, source=path)
        if path.endswith(".pyth"):
            if not isinstance(loaded, dict) or "model_state" not in loaded:
                raise ValueError(f"Cannot load .pyth file {path}: pycls files hold 'model_state'.")
            state = {
                k: v
                for k, v in loaded["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            data = {"model": state, "__author__": "pycls", "matching_heuristics": True}
        else:
            if not isinstance(loaded, dict):
                raise ValueError(f"'{path}' holds a {type(loaded).__name__}, expected a dict")
            data = loaded if "model" in loaded else {"model": loaded}
    if check_finite and isinstance(data.get("model"), dict):
        check_finite_weights(data["model"], path)
    return data


def _load_file_with_url_query(filename: str, parsed_url) -> Dict[str, Any]:
    # DetectionCheckpointer._load_file's format handling with the safe readers: the optional
    # "?matching_heuristics=True" query of ``DetectionCheckpointer.load`` applies to torch files.
    loaded = load_checkpoint_file(filename)
    if filename.endswith((".pkl", ".pyth")) or parsed_url is None:
        return loaded
    queries = parse_qs(parsed_url.query)
    if queries.pop("matching_heuristics", "False") == ["True"]:
        loaded["matching_heuristics"] = True
    if queries:
        raise ValueError(
            f"Unsupported query remaining: {queries}, original filename: {parsed_url.geturl()}"
        )
    return loaded


# --------------------------------------------------------------------------------------------
# Safe loaders for detectron2's and fvcore's checkpointers
# --------------------------------------------------------------------------------------------
def _safe_detection_load_file(self, filename: str) -> Dict[str, Any]:
    """``DetectionCheckpointer._load_file`` with the safe readers (installed by
    :func:`install_safe_loaders`)."""
    return _load_file_with_url_query(filename, getattr(self, "_parsed_url_during_load", None))


def _safe_torch_load(self, f: str) -> Any:
    """``DetectionCheckpointer._torch_load`` with ``torch.load(weights_only=True)``."""
    return torch_load_weights_only(f, source=f)


def _safe_fvcore_load_file(self, f: str) -> Dict[str, Any]:
    """fvcore ``Checkpointer._load_file`` (a torch file) with ``torch.load(weights_only=True)``
    and the NaN/Inf check of the model weights."""
    loaded = torch_load_weights_only(f, source=f)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        check_finite_weights(loaded["model"], f)
    return loaded


for _fn in (_safe_detection_load_file, _safe_torch_load, _safe_fvcore_load_file):
    _fn._seg_methods_safe_loader = True  # marks what install_safe_loaders installed


def install_safe_loaders() -> None:
    """Make detectron2's and fvcore's checkpointers read files with the safe readers.

    Replaces, on the classes (so every existing and future instance and subclass that does not
    override them is covered):

    * ``DetectionCheckpointer._load_file`` (``.pkl``: restricted unpickler instead of
      ``pickle.load``; ``.pyth`` and torch files: ``torch.load(weights_only=True)``) and
      ``DetectionCheckpointer._torch_load``;
    * fvcore's ``Checkpointer._load_file`` (``torch.load`` without ``weights_only``).

    The loaders also refuse NaN/Inf weights and name truncated files (see the module
    docstring). ``import seg_methods`` calls this; calling it again does nothing.
    """
    patches = (
        (DetectionCheckpointer, "_load_file", _safe_detection_load_file),
        (DetectionCheckpointer, "_torch_load", _safe_torch_load),
        (FvcoreCheckpointer, "_load_file", _safe_fvcore_load_file),
    )
    for cls, name, fn in patches:
        current = cls.__dict__.get(name)
        if getattr(current, "_seg_methods_safe_loader", False):
            continue
        setattr(cls, name, fn)
        logger.debug(f"seg_methods: {cls.__module__}.{cls.__name__}.{name} reads files safely")


def safe_loaders_installed() -> bool:
    """Whether :func:`install_safe_loaders` is in effect."""
    return all(
        getattr(cls.__dict__.get(name), "_seg_methods_safe_loader", False)
        for cls, name in (
            (DetectionCheckpointer, "_load_file"),
            (DetectionCheckpointer, "_torch_load"),
            (FvcoreCheckpointer, "_load_file"),
        )
    )


def require_weights(weights: str, allow_random_weights: bool, *, how_to_allow: str) -> None:
    """Refuse evaluation/inference without weights unless random weights are asked for.

    Args:
        weights (str): ``cfg.MODEL.WEIGHTS``.
        allow_random_weights (bool): the user asked for random weights explicitly.
        how_to_allow (str): how the user asks for them (e.g. "pass --random-weights").

    Raises:
        RandomWeightsError: ``weights`` is empty and random weights were not asked for.
    """
    if weights:
        return
    if not allow_random_weights:
        raise RandomWeightsError(
            "MODEL.WEIGHTS is empty: the model would run with random weights. Set MODEL.WEIGHTS "
            f"to a checkpoint (e.g. OUTPUT_DIR/model_final.pth), or {how_to_allow} if random "
            "weights are what you want."
        )
    logger.warning("MODEL.WEIGHTS is empty: running with RANDOM weights, as asked.")


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------
def strip_common_prefix(state: Dict[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    """Remove ``prefix`` (DDP's "module.") from the keys when every key carries it (as fvcore).

    Args:
        state (dict): a state dict.
        prefix (str): the prefix to remove.

    Returns:
        dict: a new dict with the stripped keys (same order), or ``state`` itself when some key
        lacks the prefix (or it is empty).
    """
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _longest_suffix_matches(model_keys: Sequence[str], ckpt_keys: Set[str]) -> Dict[str, str]:
    """detectron2's name alignment rule: the longest checkpoint key equal to the model key or to
    a suffix of it starting after a '.'.

    Returns:
        dict: model key -> matched checkpoint key (unmatched model keys are left out).
    """
    matches = {}
    for key in model_keys:
        if key in ckpt_keys:
            matches[key] = key
            continue
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1 :] in ckpt_keys:
                matches[key] = key[i + 1 :]
                break
    return matches


def _format_key_list(lines: List[str], limit: int = 200) -> str:
    shown = "\n".join("    " + line for line in lines[:limit])
    if len(lines) > limit:
        shown += f"\n    ... and {len(lines) - limit} more"
    return shown


_PERIODIC_NAME = re.compile(r"^model_(\d+)\.pth$")  # detectron2's PeriodicCheckpointer names


def _checkpoint_order(basename: str) -> Optional[float]:
    # Iteration of a checkpoint written by detectron2's PeriodicCheckpointer (model_final last).
    if basename == "model_final.pth":
        return float("inf")
    m = _PERIODIC_NAME.match(basename)
    return float(m.group(1)) if m else None


class SegCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with safe file loading and fit checks.

    See the module docstring for how to choose ``strict`` and ``allowed_shape_mismatch``, and
    for what resuming checks. Saving is unchanged (``torch.save`` of tensors and plain data,
    readable weights-only).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        strict: bool = False,
        allowed_shape_mismatch: Sequence[str] = (),
        resume_fallback: bool = False,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        """
        Args:
            model (nn.Module): model to load into (DDP/DP wrappers are unwrapped).
            save_dir (str): where ``save`` writes and ``resume_or_load`` looks.
            strict (bool): raise when model keys are missing from the checkpoint
                (evaluation/inference); default False (training, fine-tuning).
            allowed_shape_mismatch (list[str]): regular expressions (``re.search`` on model keys)
                of tensors that may have another shape in the checkpoint; they are skipped.
            resume_fallback (bool): when resuming and the last checkpoint cannot be read
                (truncated or corrupt), resume from the newest earlier readable
                ``model_XXXXXXX.pth`` of ``save_dir`` (with a warning) instead of raising.
            save_to_disk (bool or None): as in ``DetectionCheckpointer``.
            checkpointables: objects with ``state_dict``/``load_state_dict`` (optimizer, ...).
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self.allowed_shape_mismatch = [re.compile(p) for p in allowed_shape_mismatch]
        self.resume_fallback = resume_fallback
        self._strict_during_load: Optional[bool] = None
        self._exact_during_load = False
        self._path_during_load: Optional[str] = None

    def load(
        self,
        path: str,
        *args: Any,
        strict: Optional[bool] = None,
        exact: bool = False,
        **kwargs: Any,
    ):
        """Load a checkpoint (see ``DetectionCheckpointer.load``).

        Args:
            path (str): checkpoint path or URL; empty means "do not load".
            strict (bool or None): overrides the constructor's ``strict`` for this call.
            exact (bool): the checkpoint must hold exactly the model's keys (missing *and*
                unexpected keys raise); used when resuming.

        Returns:
            dict: checkpoint entries not consumed (e.g. ``iteration``).

        Raises:
            FileNotFoundError: ``path`` is a local path that does not exist.
            CheckpointSecurityError: the file needs code outside the allow-list to load.
            CheckpointReadError: the file is truncated or corrupt.
            NonFiniteWeightsError: some weights are NaN or Inf.
            CheckpointMismatchError: shapes differ, or keys are missing under strict loading.
        """
        local = urlparse(path)._replace(query="").geturl() if path else ""
        if local and "://" not in local and not os.path.isfile(local):
            raise FileNotFoundError(
                f"Checkpoint '{path}' not found (MODEL.WEIGHTS, or the last_checkpoint file of "
                "OUTPUT_DIR when resuming)."
            )
        self._strict_during_load = self.strict if strict is None else strict
        self._exact_during_load = exact
        self._path_during_load = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._strict_during_load = None
            self._exact_during_load = False
            self._path_during_load = None
            # detectron2 resets this only after a successful load; a failed one would make
            # every later load() of this checkpointer fail its "is None" assertion.
            self._parsed_url_during_load = None

    def earlier_checkpoints(self, path: str) -> List[str]:
        """Checkpoints of ``save_dir`` written before ``path`` by detectron2's
        ``PeriodicCheckpointer`` (``model_XXXXXXX.pth``), newest first."""
        order = _checkpoint_order(os.path.basename(path))
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        found = []
        for name in os.listdir(self.save_dir):
            it = _checkpoint_order(name)
            full = os.path.join(self.save_dir, name)
            if it is None or it == float("inf") or os.path.abspath(full) == os.path.abspath(path):
                continue
            if order is None or it < order:
                found.append((it, full))
        return [f for _, f in sorted(found, reverse=True)]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume from ``save_dir``'s last checkpoint if ``resume`` and there is one, else load
        the model weights of ``path`` (as detectron2).

        Resuming loads exactly (see :meth:`load`'s ``exact``) and explains failures: another
        model's checkpoint (:class:`CheckpointMismatchError`), or an unreadable last checkpoint
        (:class:`CheckpointReadError` naming the earlier checkpoints; with
        ``resume_fallback`` the newest readable one is used instead).
        """
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        try:
            return self.load(last, strict=True, exact=True)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(
                f"Cannot resume from '{last}' (the last checkpoint of {self.save_dir}): it was "
                "written by another model or another config.\n"
                f"{e}\n  Train this config in another OUTPUT_DIR, or drop --resume to start "
                f"from iteration 0 (MODEL.WEIGHTS {last} initialises from it if it fits).",
                incorrect_shapes=e.incorrect_shapes,
                missing_keys=e.missing_keys,
                unexpected_keys=e.unexpected_keys,
            ) from e
        except (CheckpointReadError, FileNotFoundError) as e:
            earlier = self.earlier_checkpoints(last)
            if not (self.resume_fallback and earlier):
                raise self._resume_read_error(last, e, earlier) from e
            first_error = e
        for candidate in earlier:
            logger.warning(
                f"Cannot read the last checkpoint '{last}' ({first_error}); resuming from the "
                f"earlier checkpoint '{candidate}' instead (resume_fallback)."
            )
            try:
                return self.load(candidate, strict=True, exact=True)
            except CheckpointReadError as e:
                first_error = e
        raise self._resume_read_error(last, first_error, [])

    def _resume_read_error(
        self, last: str, error: Exception, earlier: List[str]
    ) -> CheckpointReadError:
        what = "does not exist" if isinstance(error, FileNotFoundError) else "cannot be read"
        lines = [
            f"Cannot resume: the last checkpoint '{last}' (named by "
            f"{os.path.join(self.save_dir, 'last_checkpoint')}) {what}: {error}"
        ]
        if earlier:
            previous = os.path.basename(earlier[0])
            lines.append(
                f"  The earlier checkpoint '{earlier[0]}' exists. To resume from it, run\n"
                f"      echo {previous} > {os.path.join(self.save_dir, 'last_checkpoint')}\n"
                "  and rerun with --resume, or add --resume-fallback (train_net.py; "
                "resume_fallback=True in Python) to fall back to the newest readable earlier "
                "checkpoint automatically."
            )
            if len(earlier) > 1:
                lines.append(f"  Other earlier checkpoints: {', '.join(earlier[1:6])}")
        else:
            lines.append(
                "  No earlier model_XXXXXXX.pth exists in that folder: drop --resume to train "
                "from the start."
            )
        return CheckpointReadError("\n".join(lines), path=last, earlier=earlier)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return _load_file_with_url_query(filename, self._parsed_url_during_load)

    def _torch_load(self, f: str) -> Any:
        return torch_load_weights_only(f, source=f)

    def _is_allowed_mismatch(self, key: str) -> bool:
        return any(p.search(key) for p in self.allowed_shape_mismatch)

    def _missing_keys(self, model_state: Dict[str, torch.Tensor], loaded: Set[str]) -> List[str]:
        missing = set(model_state) - loaded
        # As detectron2: pixel_mean/pixel_std come from the config, not the checkpoint.
        own_buffers = dict(self.model.named_buffers(recurse=False))
        missing -= {k for k in ("pixel_mean", "pixel_std") if k in own_buffers}
        # A tensor shared under several names counts as loaded if one of its names is.
        names_by_tensor: Dict[int, List[str]] = collections.defaultdict(list)
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            names_by_tensor[id(tensor)].append(name)
        for names in names_by_tensor.values():
            if any(n in loaded for n in names):
                missing -= set(names)
        return sorted(missing)

    def _load_model(self, checkpoint: Dict[str, Any]):
        state = checkpoint["model"]
        self._convert_ndarray_to_tensor(state)
        state = checkpoint["model"] = strip_common_prefix(state, "module.")
        model_state = self.model.state_dict()
        source = self._path_during_load or "<checkpoint>"

        mismatched = []  # (model key, checkpoint key, checkpoint shape, model shape)
        if checkpoint.get("matching_heuristics", False):
            if checkpoint.get("__author__") == "Caffe2":
                state, _ = convert_c2_detectron_names(state)
            matches = _longest_suffix_matches(sorted(model_state), set(state))
            prefixes = Counter(mk[: len(mk) - len(ck)] for mk, ck in matches.items())
            dominant = prefixes.most_common(1)[0][0] if prefixes else ""
            for mk, ck in matches.items():
                if tuple(state[ck].shape) != tuple(model_state[mk].shape):
                    prefix = mk[: len(mk) - len(ck)]
                    if prefix in ("", dominant):  # a real counterpart, not a stray suffix
                        mismatched.append(
                            (mk, ck, tuple(state[ck].shape), tuple(model_state[mk].shape))
                        )
            # detectron2's alignment drops every mismatched pair (and logs it); names are final.
            state = align_and_update_state_dicts(model_state, state, c2_conversion=False)
            checkpoint["model"] = state
            checkpoint["matching_heuristics"] = False
        else:
            for k, v in state.items():
                if k in model_state and not isinstance(
                    model_state[k], nn.parameter.UninitializedParameter
                ):
                    if tuple(v.shape) != tuple(model_state[k].shape):
                        mismatched.append((k, k, tuple(v.shape), tuple(model_state[k].shape)))

        errors = []
        for mk, ck, shape_ckpt, shape_model in mismatched:
            if self._is_allowed_mismatch(mk):
                logger.warning(
                    f"Skip loading '{mk}' (allowed shape mismatch): {shape_ckpt} in the "
                    f"checkpoint, {shape_model} in the model."
                )
                if state.get(mk) is not None and tuple(state[mk].shape) != shape_model:
                    state.pop(mk)
            else:
                name = mk if mk == ck else f"{mk} (checkpoint: {ck})"
                errors.append((name, shape_ckpt, shape_model))

        strict = self.strict if self._strict_during_load is None else self._strict_during_load
        loaded = {
            k
            for k, v in state.items()
            if k in model_state and tuple(v.shape) == tuple(model_state[k].shape)
        }
        missing = self._missing_keys(model_state, loaded) if strict else []
        unexpected = sorted(set(state) - set(model_state)) if self._exact_during_load else []

        if errors or missing or unexpected:
            parts = [f"Checkpoint '{source}' does not fit the model:"]
            if errors:
                parts.append(
                    f"  {len(errors)} tensor(s) have another shape than in the model:\n"
                    + _format_key_list(
                        [f"{n}: {c} in checkpoint, {m} in model" for n, c, m in errors]
                    )
                )
            if missing:
                parts.append(
                    f"  {len(missing)} model key(s) are missing from the checkpoint "
                    "(strict loading):\n" + _format_key_list(missing)
                )
            if unexpected:
                parts.append(
                    f"  {len(unexpected)} checkpoint key(s) are not in the model:\n"
                    + _format_key_list(unexpected)
                )
            parts.append(
                "  Nothing was loaded. Check the config (model size, window size, number of "
                "classes) against the checkpoint; to skip shape mismatches on purpose pass "
                "allowed_shape_mismatch=[regex] to SegCheckpointer; missing keys are allowed "
                "with strict=False."
            )
            raise CheckpointMismatchError(
                "\n".join(parts),
                incorrect_shapes=[(n, c, m) for n, c, m in errors],
                missing_keys=missing,
                unexpected_keys=unexpected,
            )
        return super()._load_model(checkpoint)


def save_converted_checkpoint(state: Dict[str, torch.Tensor], path: str, author: str) -> None:
    """Write weights converted from another layout (``tools/convert_*_weights.py``).

    The file is ``torch.save({"model": state, "__author__": author, "matching_heuristics":
    False})``: the names are ours already, so :class:`SegCheckpointer` loads it strictly and
    without name matching. The output's folder is created.

    Args:
        state (dict[str, Tensor]): our parameter and buffer names -> tensors.
        path (str): output .pth file.
        author (str): where the weights come from (kept in the file).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": state, "__author__": author, "matching_heuristics": False}, path)
