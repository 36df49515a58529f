"""Every YAML under ``configs/`` loads, stays inside ``configs/``, writes only deltas and builds.

The main tests are parametrised over the YAML files found under ``configs/`` (recursively, so the
``synthetic/`` and ``quick_schedules/`` configs are included):

* ``test_yaml_loads``: safe YAML (no ``!!python`` tags); ``_BASE_`` chain relative, inside
  ``configs/`` and acyclic; merge into :func:`seg_methods.config.get_cfg` with
  ``allow_unsafe=False``; datasets registered; every key a file writes changes the value it
  inherits (CONVENTIONS.md rule 7: files carry only deltas; ``VERSION`` is exempt).
* ``test_yaml_builds``: ``detectron2.modeling.build_model`` on every config as written (all
  but the data-only dataset bases), with
  checks of the built model against the config (classes, queries, decoder and encoder layers,
  backbone widths and strides) through the parameter names of the public Mask2Former
  checkpoints, and, for the COCO models, the parameter counts of the paper's Tables 1 and 2.
* ``test_official_settings``: the Mask2Former configs for real datasets carry the official
  settings, typed in this file from the official configs (not read from our YAMLs).
* The layout (configs/README.md): one data-only base per dataset and task,
  ``configs/<dataset>/<task>/Base-<Dataset>-<Task>.yaml`` (``test_dataset_base_is_data_only``);
  every config under ``configs/<dataset>/<task>/<method>/`` reaches it through its ``_BASE_``
  chain, and a method's base file ``Base-<Dataset>-<Task>-<Method>.yaml`` inherits it directly
  (``test_chain_reaches_dataset_base``); every quick-schedule config reaches a synthetic dataset
  base, and every meta-architecture that seg_methods registers has at least one quick config
  (``test_quick_config_chain``, ``test_every_meta_architecture_has_a_quick_config``).
  Dataset bases are loaded but not built: they hold no model.

Build policy, measured by building every config with this file's helpers (2 torch threads, on a
shared machine whose load varied, so wall times are indicative only): building the 54
real-dataset configs for real on the CPU took 66.4 s of CPU time (127 s wall), almost all of it
spent filling parameters with random numbers (one Swin-L model: 3-7 s wall). That is over the
suite's budget, so every config goes through the same ``build_model`` call with its parameters
created on the meta device (:class:`_ParamsOnMeta`): the modules, parameter names and shapes are
those of the CPU build, without storage. Configs whose ``MODEL`` node only differs in
``WEIGHTS`` build the same modules, so each distinct model is built once (35 builds for the 54
configs): 14.0 s of CPU time (20.2 s without that cache). A representative subset
(``CPU_BUILDS``: the default COCO panoptic R50 model, a Swin-T model and a SyncBN Cityscapes
model) plus every config whose path contains ``synthetic`` or ``instant_test`` is also built for
real on the CPU, and its CPU and meta builds must have identical parameter names and shapes,
which shows that the meta build stands for the CPU one. Weights are never loaded
(``MODEL.WEIGHTS`` is cleared).
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from torch.overrides import TorchFunctionMode

import seg_methods  # noqa: F401  registers meta-architectures, backbones and datasets
from seg_methods.config import get_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = (REPO_ROOT / "configs").resolve()
ALL_YAMLS: List[Path] = sorted(CONFIG_ROOT.rglob("*.yaml"))
QUICK_DIR = CONFIG_ROOT / "quick_schedules"
QUICK_YAMLS: List[Path] = sorted(QUICK_DIR.glob("*.yaml"))
# configs/<dataset>/<task>/Base-<Dataset>-<Task>.yaml: data, input pipeline and evaluation only.
DATASET_BASES: List[Path] = sorted(
    p for p in ALL_YAMLS if len(p.relative_to(CONFIG_ROOT).parts) == 3 and p.parent != QUICK_DIR
)
# Everything that describes a model (method bases, leaves, quick schedules).
MODEL_YAMLS: List[Path] = [p for p in ALL_YAMLS if p not in DATASET_BASES]
# Keys a dataset base may write under MODEL: facts of the data, not of a method.
DATASET_MODEL_KEYS = {
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
    "MODEL.DEVICE",  # the embedded dataset is the CPU benchmark
}

# Real CPU builds (besides synthetic / instant-test configs); see the module docstring.
CPU_BUILDS = {
    "coco/panoptic-segmentation/mask2former/mask2former_R50_bs16_50ep.yaml",
    "coco/instance-segmentation/mask2former/swin/mask2former_swin_tiny_bs16_50ep.yaml",
    "cityscapes/semantic-segmentation/mask2former/mask2former_R50_bs16_90k.yaml",
}


def _rel(path: Path) -> str:
    return path.resolve().relative_to(CONFIG_ROOT).as_posix()


def _read_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)  # raises on !!python/... tags
    return data or {}


def _base_chain(path: Path) -> List[Path]:
    """``[path, parent, grandparent, ...]`` following ``_BASE_``; asserts the chain is sound."""
    chain = [path.resolve()]
    while True:
        base = _read_yaml(chain[-1]).get("_BASE_")
        if base is None:
            return chain
        where = f"_BASE_ '{base}' in {_rel(chain[-1])}"
        assert isinstance(base, str), f"{where}: must be one relative path"
        assert not os.path.isabs(base) and "://" not in base, f"{where}: must be relative"
        # Lexical check: the path may not climb out of configs/ even to come back in
        # ("../../../../configs/..." as in PointRend and DeepLab).
        lexical = os.path.normpath(os.path.join(os.path.dirname(_rel(chain[-1])), base))
        assert not lexical.startswith(".."), f"{where}: leaves configs/"
        parent = (chain[-1].parent / base).resolve()
        assert parent.is_relative_to(CONFIG_ROOT), f"{where}: leaves configs/"
        assert parent.is_file(), f"{where}: no such file"
        assert parent not in chain, f"{where}: cycle"
        chain.append(parent)


def _load_cfg(path: Optional[Path]):
    cfg = get_cfg()
    if path is not None:
        cfg.merge_from_file(str(path), allow_unsafe=False)
    return cfg


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _norm(v):
    """Make lists and tuples comparable (yacs keeps whichever the YAML or default used)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("path", ALL_YAMLS, ids=_rel)
def test_yaml_loads(path: Path):
    chain = _base_chain(path)
    cfg = _load_cfg(path)
    if path not in DATASET_BASES:
        assert cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN", "no META_ARCHITECTURE set"
    unknown = [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n not in DatasetCatalog]
    assert not unknown, f"datasets not registered by seg_methods or detectron2: {unknown}"

    # Only deltas: every key written here must change what the parent chain (or get_cfg) gives.
    parent_cfg = _load_cfg(chain[1] if len(chain) > 1 else None)
    written = _flatten({k: v for k, v in _read_yaml(path).items() if k != "_BASE_"})
    redundant = [
        k for k in written if k != "VERSION" and _norm(_get(parent_cfg, k)) == _norm(_get(cfg, k))
    ]
    assert not redundant, f"{_rel(path)} restates inherited values: {redundant}"


def test_configs_found():
    rels = {_rel(p) for p in ALL_YAMLS}
    assert CPU_BUILDS <= rels, sorted(CPU_BUILDS - rels)
    assert DATASET_BASES and QUICK_YAMLS


# --------------------------------------------------------------------------- layout


def _task_word(task_dir: str) -> str:
    """``"panoptic-segmentation"`` -> ``"PanopticSegmentation"`` (the Base file's suffix)."""
    return "".join(w.capitalize() for w in task_dir.split("-"))


def _dataset_base(folder: Path) -> Path:
    """The one ``Base-*.yaml`` of ``configs/<dataset>/<task>/``; asserts there is exactly one."""
    bases = sorted(folder.glob("Base-*.yaml"))
    assert len(bases) == 1, f"{_rel(folder)}/ needs exactly one Base-*.yaml, has {bases}"
    return bases[0].resolve()


@pytest.mark.parametrize("path", DATASET_BASES, ids=_rel)
def test_dataset_base_is_data_only(path: Path):
    """A dataset base writes data, input, evaluation and loader keys, and no method's keys."""
    rel = _rel(path)
    assert path.parent.name.endswith("-segmentation"), f"{rel}: task folder is <task>-segmentation"
    suffix = f"-{_task_word(path.parent.name)}.yaml"
    named = path.name.startswith("Base-") and path.name.endswith(suffix)
    assert named, f"{rel}: name it Base-<Dataset>{suffix}"
    data = _read_yaml(path)
    assert "_BASE_" not in data, f"{rel}: a dataset base is the root of its chain"
    written = _flatten({k: v for k, v in data.items() if k != "VERSION"})
    method_keys = [
        k
        for k in written
        if k.startswith("SOLVER.")
        or (k.startswith("MODEL.") and k not in DATASET_MODEL_KEYS)
        or k == "INPUT.FORMAT"  # the backbone's pretraining decides RGB/BGR (with PIXEL_MEAN)
    ]
    assert not method_keys, f"{rel}: method keys belong in <method>/ files: {method_keys}"
    assert written.get("DATASETS.TRAIN") and written.get("DATASETS.TEST"), f"{rel}: no DATASETS"


@pytest.mark.parametrize(
    "path",
    [p for p in MODEL_YAMLS if p.parent != QUICK_DIR],
    ids=_rel,
)
def test_chain_reaches_dataset_base(path: Path):
    """configs/<dataset>/<task>/<method>/**.yaml inherits configs/<dataset>/<task>/Base-*.yaml."""
    rel = _rel(path)
    parts = Path(rel).parts
    assert len(parts) >= 4, (
        f"{rel}: a method's config lives in configs/<dataset>/<task>/<method>/ "
        "(or configs/quick_schedules/)"
    )
    dataset_base = _dataset_base(CONFIG_ROOT / parts[0] / parts[1])
    chain = _base_chain(path)
    names = [_rel(p) for p in chain]
    assert dataset_base in chain, f"{rel}: its _BASE_ chain {names} misses {_rel(dataset_base)}"
    if path.name.startswith("Base-"):
        # Base-<Dataset>-<Task>-<Method>.yaml, directly on top of the dataset base.
        stem = dataset_base.name[: -len(".yaml")]
        named = path.name.startswith(stem + "-") and len(parts) == 4
        assert named, f"{rel}: a method base is <method>/{stem}-<Method>.yaml"
        assert chain[1] == dataset_base, f"{rel}: _BASE_ must be ../{dataset_base.name}"
        method = path.name[len(stem) + 1 : -len(".yaml")]
        meta = _load_cfg(path).MODEL.META_ARCHITECTURE
        assert method == meta, f"{rel}: named after {method}, builds {meta}"


@pytest.mark.parametrize("path", QUICK_YAMLS, ids=_rel)
def test_quick_config_chain(path: Path):
    """A quick schedule is a few iterations of a config on the embedded (synthetic) dataset."""
    assert path.name.endswith("_instant_test.yaml"), f"{_rel(path)}: name it *_instant_test.yaml"
    chain = _base_chain(path)
    roots = [p for p in chain if p in DATASET_BASES]
    assert roots and _rel(roots[0]).startswith("synthetic/"), (
        f"{_rel(path)}: its _BASE_ chain {[_rel(p) for p in chain]} reaches no "
        "configs/synthetic/<task>/Base-*.yaml"
    )


def test_every_meta_architecture_has_a_quick_config():
    """Every meta-architecture seg_methods registers can be smoke-tested by a quick config."""
    ours = {name for name, obj in META_ARCH_REGISTRY if obj.__module__.startswith("seg_methods.")}
    covered = {_load_cfg(p).MODEL.META_ARCHITECTURE for p in QUICK_YAMLS}
    missing = sorted(ours - covered)
    where = "configs/quick_schedules/*_instant_test.yaml"
    assert not missing, f"meta-architectures without a {where}: {missing}"


# --------------------------------------------------------------------------- build

# Parameter counts (millions, rounded) of Mask2Former in the paper's Tables 1 and 2 (COCO panoptic
# and instance segmentation).
PAPER_PARAMS_M = {
    "R50": 44,
    "R101": 63,
    "swin_tiny": 47,
    "swin_small": 69,
    "swin_base_384": 107,
    "swin_base_IN21k_384": 107,
    "swin_large_IN21k_384": 216,
}


class _ParamsOnMeta(TorchFunctionMode):
    """Create the tensors of the usual parameter factories on the meta device.

    Like ``with torch.device("meta")`` but only for these factories, so small helper tensors
    (``torch.linspace(...).tolist()`` for drop-path rates, ``torch.arange`` for index buffers)
    stay on the CPU and keep their values; ``build_model`` then moves everything to meta.
    """

    FACTORIES = {
        torch.empty,
        torch.empty_strided,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.rand,
        torch.randn,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build(cfg, device: str):
    """``build_model`` without loading weights, on ``"cpu"`` or ``"meta"`` (no storage)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    if device == "cpu":
        return build_model(cfg)
    with _ParamsOnMeta():
        return build_model(cfg)


# Meta builds, keyed by the MODEL node: configs that differ only outside MODEL (schedule, data,
# task flags) or in MODEL.WEIGHTS build the same modules, so each distinct model is built once.
_META_MODELS: Dict[str, torch.nn.Module] = {}


def _meta_model(cfg):
    node = cfg.MODEL.clone()
    node.defrost()
    node.WEIGHTS = ""
    key = node.dump()
    if key not in _META_MODELS:
        _META_MODELS[key] = _build(cfg, "meta")
    return _META_MODELS[key]


def _shapes(model) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_mask2former(model, cfg):
    """Structure of a Mask2Former model against its config, via the checkpoint's names."""
    sd = _shapes(model)
    m = cfg.MODEL.MASK2FORMER
    k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    pred = "sem_seg_head.predictor."
    assert sd[pred + "class_embed.weight"] == (k + 1, m.HIDDEN_DIM)
    assert sd[pred + "query_feat.weight"] == (m.NUM_OBJECT_QUERIES, m.HIDDEN_DIM)
    assert sd[pred + "query_embed.weight"] == (m.NUM_OBJECT_QUERIES, m.HIDDEN_DIM)
    for kind in ("cross_attention", "self_attention", "ffn"):
        layers = {n.split(".")[3] for n in sd if n.startswith(f"{pred}transformer_{kind}_layers.")}
        assert len(layers) == m.DEC_LAYERS, (kind, sorted(layers))
    enc = {n.split(".")[5] for n in sd if ".pixel_decoder.transformer.encoder.layers." in n}
    assert len(enc) == cfg.MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_ENC_LAYERS

    # Backbone widths at strides 4, 8, 16, 32.
    shapes = model.backbone.output_shape()
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        widths = [cfg.MODEL.SWIN.EMBED_DIM * 2**i for i in range(4)]
    else:
        widths = [cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 2**i for i in range(4)]
    assert [shapes[f].channels for f in ("res2", "res3", "res4", "res5")] == widths
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=_rel)
def test_yaml_builds(path: Path):
    rel = _rel(path)
    cfg = _load_cfg(path)
    # (HSSN) A dataset whose classes are read from its own files at registration (metadata
    # "classes_file": Mapillary Vistas 2.0's config_v2.0.json) has no class tree without them.
    for name in cfg.DATASETS.TRAIN:
        classes_file = MetadataCatalog.get(name).get("classes_file", None)
        if classes_file is not None and not os.path.isfile(classes_file):
            pytest.skip(f"{name}: its classes are read from {classes_file}, absent here")
    model = _meta_model(cfg)
    assert model.training
    assert all(p.is_meta for p in model.parameters())

    if cfg.MODEL.META_ARCHITECTURE == "Mask2Former":
        _check_mask2former(model, cfg)
        if rel.startswith("coco/") and not Path(rel).name.startswith("Base-"):
            # e.g. mask2former_swin_base_IN21k_384_bs16_50ep.yaml -> swin_base_IN21k_384
            stem = Path(rel).stem[len("mask2former_") :]
            backbone = stem[: stem.index("_bs")]
            n = sum(p.numel() for p in model.parameters())
            assert round(n / 1e6) == PAPER_PARAMS_M[backbone], (backbone, n)

    if rel in CPU_BUILDS or "synthetic" in rel or "instant_test" in rel:
        cpu_model = _build(cfg, "cpu")
        assert all(p.device.type == "cpu" for p in cpu_model.parameters())
        assert _shapes(cpu_model) == _shapes(model)


# --------------------------------------------------------------------------- official settings


def _ms(short: int) -> List[int]:
    """The official multi-scale training sizes, 0.5x to 2.0x of ``short`` (their eval string)."""
    return [int(x * 0.1 * short) for x in range(5, 21)]


COMMON = {
    "MODEL.META_ARCHITECTURE": "Mask2Former",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 255,
    "MODEL.MASK2FORMER.TRANSFORMER_DECODER_NAME": "Mask2FormerMaskedAttentionDecoder",
    "MODEL.MASK2FORMER.PIXEL_DECODER_NAME": "Mask2FormerMSDeformAttnPixelDecoder",
    # The pixel decoder's keys (official SEM_SEG_HEAD.* and MASK_FORMER.{NHEADS, DROPOUT}, which
    # the official encoder reads too) live in the decoder's own node.
    "MODEL.MSDEFORM_PIXEL_DECODER.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.MSDEFORM_PIXEL_DECODER.COMMON_STRIDE": 4,
    "MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_ENC_LAYERS": 6,
    "MODEL.MSDEFORM_PIXEL_DECODER.CONVS_DIM": 256,
    "MODEL.MSDEFORM_PIXEL_DECODER.MASK_DIM": 256,
    "MODEL.MSDEFORM_PIXEL_DECODER.NORM": "GN",
    "MODEL.MSDEFORM_PIXEL_DECODER.NHEADS": 8,
    "MODEL.MSDEFORM_PIXEL_DECODER.DROPOUT": 0.0,
    "MODEL.MASK2FORMER.HIDDEN_DIM": 256,
    "MODEL.MASK2FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK2FORMER.NHEADS": 8,
    "MODEL.MASK2FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK2FORMER.PRE_NORM": False,
    "MODEL.MASK2FORMER.ENFORCE_INPUT_PROJ": False,
    "MODEL.MASK2FORMER.SIZE_DIVISIBILITY": 32,
    "MODEL.MASK2FORMER.DEC_LAYERS": 9,  # the official YAMLs write 10 (see configs/README.md)
    "MODEL.MASK_CLS.DEEP_SUPERVISION": True,
    "MODEL.MASK_CLS.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.MASK_CLS.CLASS_WEIGHT": 2.0,
    "MODEL.MASK_CLS.MASK_WEIGHT": 5.0,
    "MODEL.MASK_CLS.DICE_WEIGHT": 5.0,
    "MODEL.MASK_CLS.TRAIN_NUM_POINTS": 12544,
    "MODEL.MASK_CLS.OVERSAMPLE_RATIO": 3.0,
    "MODEL.MASK_CLS.IMPORTANCE_SAMPLE_RATIO": 0.75,
    "MODEL.MASK_CLS.OVERLAP_THRESHOLD": 0.8,
    "MODEL.MASK_CLS.OBJECT_MASK_THRESHOLD": 0.8,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.0001,
    "SOLVER.WARMUP_FACTOR": 1.0,
    "SOLVER.WEIGHT_DECAY": 0.05,
    "SOLVER.OPTIMIZER": "ADAMW",
    "SOLVER.BACKBONE_MULTIPLIER": 0.1,
    "SOLVER.CLIP_GRADIENTS.ENABLED": True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0,
    "SOLVER.AMP.ENABLED": True,
    "INPUT.FORMAT": "RGB",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "DATALOADER.NUM_WORKERS": 4,
}


def _flags(sem: bool, ins: bool, pan: bool) -> Dict[str, bool]:
    return {"TEST.SEMANTIC_ON": sem, "TEST.INSTANCE_ON": ins, "TEST.PANOPTIC_ON": pan}


def _lsj(num_classes, train, test, mapper, flags):
    return {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": num_classes,
        "DATASETS.TRAIN": [train],
        "DATASETS.TEST": [test],
        "INPUT.DATASET_MAPPER_NAME": mapper,
        "INPUT.IMAGE_SIZE": 1024,
        "INPUT.MIN_SCALE": 0.1,
        "INPUT.MAX_SCALE": 2.0,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
        "SOLVER.STEPS": [327778, 355092],
        "SOLVER.MAX_ITER": 368750,
        "SOLVER.WARMUP_ITERS": 10,
        "TEST.EVAL_PERIOD": 5000,
        **flags,
    }


def _shortest_edge(short, max_train, max_test, crop, size_div, max_iter, aug, aug_max):
    out = {
        "INPUT.MIN_SIZE_TRAIN": _ms(short),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
        "INPUT.MIN_SIZE_TEST": short,
        "INPUT.MAX_SIZE_TRAIN": max_train,
        "INPUT.MAX_SIZE_TEST": max_test,
        "INPUT.CROP.ENABLED": True,
        "INPUT.CROP.TYPE": "absolute",
        "INPUT.CROP.SIZE": crop,
        "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0,
        "INPUT.COLOR_AUG_SSD": True,
        "INPUT.SIZE_DIVISIBILITY": size_div,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR",
        "SOLVER.MAX_ITER": max_iter,
        "SOLVER.WARMUP_ITERS": 0,
        "SOLVER.POLY_LR_POWER": 0.9,
        "TEST.AUG.ENABLED": False,
        "TEST.AUG.FLIP": True,
    }
    if aug is not None:
        out.update({"TEST.AUG.MIN_SIZES": aug, "TEST.AUG.MAX_SIZE": aug_max})
    return out


ADE512 = _shortest_edge(
    512, 2048, 2048, [512, 512], 512, 160000, [256, 384, 512, 640, 768, 896], 3584
)
ADE640 = _shortest_edge(
    640, 2560, 2560, [640, 640], 640, 160000, [320, 480, 640, 800, 960, 1120], 4480
)
CITYSCAPES = _shortest_edge(
    1024, 4096, 2048, [512, 1024], -1, 90000, [512, 768, 1024, 1280, 1536, 1792], 4096
)
MAPILLARY = _shortest_edge(2048, 8192, 2048, [1024, 1024], 1024, 300000, None, None)


def _data(num_classes, train, test, mapper, flags, **extra):
    return {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": num_classes,
        "DATASETS.TRAIN": [train],
        "DATASETS.TEST": [test],
        "INPUT.DATASET_MAPPER_NAME": mapper,
        **flags,
        **extra,
    }


SYNC_BN = {"MODEL.RESNETS.NORM": "SyncBN"}
MV = {
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 65,
    "MODEL.MASK_CLS.OBJECT_MASK_THRESHOLD": 0.0,
    "TEST.EVAL_PERIOD": 0,
    "DATALOADER.NUM_WORKERS": 10,
}

# task folder -> settings of every config in that folder (with COMMON)
TASKS = {
    "coco/panoptic-segmentation": _lsj(
        133,
        "coco_2017_train_panoptic",
        "coco_2017_val_panoptic_with_sem_seg",
        "coco_panoptic_lsj",
        _flags(True, True, True),
    ),
    "coco/instance-segmentation": _lsj(
        80, "coco_2017_train", "coco_2017_val", "coco_instance_lsj", _flags(False, True, False)
    ),
    "ade20k/semantic-segmentation": {
        **ADE512,
        **_data(
            150,
            "ade20k_sem_seg_train",
            "ade20k_sem_seg_val",
            "mask_former_semantic",
            _flags(True, False, False),
            **{"TEST.EVAL_PERIOD": 5000},
        ),
    },
    "ade20k/panoptic-segmentation": {
        **ADE640,
        **_data(
            150,
            "ade20k_panoptic_train",
            "ade20k_panoptic_val",
            "mask_former_panoptic",
            _flags(True, True, True),
            **{"TEST.EVAL_PERIOD": 5000},
        ),
    },
    "cityscapes/semantic-segmentation": {
        **CITYSCAPES,
        **SYNC_BN,
        **_data(
            19,
            "cityscapes_fine_sem_seg_train",
            "cityscapes_fine_sem_seg_val",
            "mask_former_semantic",
            _flags(True, False, False),
            **{"TEST.EVAL_PERIOD": 5000},
        ),
    },
    "cityscapes/panoptic-segmentation": {
        **CITYSCAPES,
        **SYNC_BN,
        **_data(
            19,
            "cityscapes_fine_panoptic_train",
            "cityscapes_fine_panoptic_val",
            "mask_former_panoptic",
            _flags(True, True, True),
            **{"TEST.EVAL_PERIOD": 5000},
        ),
    },
    "cityscapes/instance-segmentation": {
        **CITYSCAPES,
        **SYNC_BN,
        **_data(
            8,
            "cityscapes_fine_instance_seg_train",
            "cityscapes_fine_instance_seg_val",
            "mask_former_instance",
            _flags(False, True, False),
            **{"TEST.EVAL_PERIOD": 5000},
        ),
    },
    "mapillary-vistas/panoptic-segmentation": {
        **MAPILLARY,
        **MV,
        **_data(
            65,
            "mapillary_vistas_panoptic_train",
            "mapillary_vistas_panoptic_val",
            "mask_former_panoptic",
            _flags(True, False, True),
        ),
    },
    "mapillary-vistas/semantic-segmentation": {
        **MAPILLARY,
        **MV,
        **_data(
            65,
            "mapillary_vistas_sem_seg_train",
            "mapillary_vistas_sem_seg_val",
            "mask_former_semantic",
            _flags(True, False, False),
        ),
    },
}


def _swin(embed, depths, heads, window, pretrain, weights):
    return {
        "MODEL.BACKBONE.NAME": "D2SwinTransformer",
        "MODEL.SWIN.EMBED_DIM": embed,
        "MODEL.SWIN.DEPTHS": depths,
        "MODEL.SWIN.NUM_HEADS": heads,
        "MODEL.SWIN.WINDOW_SIZE": window,
        "MODEL.SWIN.PRETRAIN_IMG_SIZE": pretrain,
        "MODEL.SWIN.PATCH_SIZE": 4,
        "MODEL.SWIN.MLP_RATIO": 4.0,
        "MODEL.SWIN.APE": False,
        "MODEL.SWIN.PATCH_NORM": True,
        "MODEL.SWIN.DROP_PATH_RATE": 0.3,
        "MODEL.SWIN.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.WEIGHTS": weights,
    }


BACKBONES = {
    "R50": {
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    },
    "R101": {
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.RESNETS.DEPTH": 101,
        "MODEL.WEIGHTS": "R-101.pkl",
    },
    "swin_tiny": _swin(
        96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, "swin_tiny_patch4_window7_224.pkl"
    ),
    "swin_small": _swin(
        96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224, "swin_small_patch4_window7_224.pkl"
    ),
    "swin_base_384": _swin(
        128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, "swin_base_patch4_window12_384.pkl"
    ),
    "swin_base_IN21k_384": _swin(
        128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, "swin_base_patch4_window12_384_22k.pkl"
    ),
    "swin_large_IN21k_384": _swin(
        192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, "swin_large_patch4_window12_384_22k.pkl"
    ),
}

Q200 = {"MODEL.MASK2FORMER.NUM_OBJECT_QUERIES": 200}
COCO_100EP = {"SOLVER.STEPS": [655556, 710184], "SOLVER.MAX_ITER": 737500}
ADE_RES640 = {k: v for k, v in ADE640.items() if k.startswith(("INPUT.", "TEST.AUG."))}

# config (relative to configs/) -> (backbone, settings of this config only)
M2F = "mask2former"
OFFICIAL = {
    # COCO panoptic
    f"coco/panoptic-segmentation/{M2F}/mask2former_R50_bs16_50ep.yaml": ("R50", {}),
    f"coco/panoptic-segmentation/{M2F}/mask2former_R101_bs16_50ep.yaml": ("R101", {}),
    f"coco/panoptic-segmentation/{M2F}/swin/mask2former_swin_tiny_bs16_50ep.yaml": (
        "swin_tiny",
        {},
    ),
    f"coco/panoptic-segmentation/{M2F}/swin/mask2former_swin_small_bs16_50ep.yaml": (
        "swin_small",
        {},
    ),
    f"coco/panoptic-segmentation/{M2F}/swin/mask2former_swin_base_384_bs16_50ep.yaml": (
        "swin_base_384",
        {},
    ),
    f"coco/panoptic-segmentation/{M2F}/swin/mask2former_swin_base_IN21k_384_bs16_50ep.yaml": (
        "swin_base_IN21k_384",
        {},
    ),
    f"coco/panoptic-segmentation/{M2F}/swin/mask2former_swin_large_IN21k_384_bs16_100ep.yaml": (
        "swin_large_IN21k_384",
        {**Q200, **COCO_100EP},
    ),
    # COCO instance
    f"coco/instance-segmentation/{M2F}/mask2former_R50_bs16_50ep.yaml": ("R50", {}),
    f"coco/instance-segmentation/{M2F}/mask2former_R101_bs16_50ep.yaml": ("R101", {}),
    f"coco/instance-segmentation/{M2F}/swin/mask2former_swin_tiny_bs16_50ep.yaml": (
        "swin_tiny",
        {},
    ),
    f"coco/instance-segmentation/{M2F}/swin/mask2former_swin_small_bs16_50ep.yaml": (
        "swin_small",
        {},
    ),
    f"coco/instance-segmentation/{M2F}/swin/mask2former_swin_base_384_bs16_50ep.yaml": (
        "swin_base_384",
        {},
    ),
    f"coco/instance-segmentation/{M2F}/swin/mask2former_swin_base_IN21k_384_bs16_50ep.yaml": (
        "swin_base_IN21k_384",
        {},
    ),
    f"coco/instance-segmentation/{M2F}/swin/mask2former_swin_large_IN21k_384_bs16_100ep.yaml": (
        "swin_large_IN21k_384",
        {**Q200, **COCO_100EP},
    ),
    # ADE20K semantic
    f"ade20k/semantic-segmentation/{M2F}/mask2former_R50_bs16_160k.yaml": ("R50", {}),
    f"ade20k/semantic-segmentation/{M2F}/mask2former_R101_bs16_160k.yaml": ("R101", SYNC_BN),
    f"ade20k/semantic-segmentation/{M2F}/swin/mask2former_swin_tiny_bs16_160k.yaml": (
        "swin_tiny",
        {},
    ),
    f"ade20k/semantic-segmentation/{M2F}/swin/mask2former_swin_small_bs16_160k.yaml": (
        "swin_small",
        {},
    ),
    f"ade20k/semantic-segmentation/{M2F}/swin/mask2former_swin_base_384_bs16_160k_res640.yaml": (
        "swin_base_384",
        ADE_RES640,
    ),
    f"ade20k/semantic-segmentation/{M2F}/swin/"
    "mask2former_swin_base_IN21k_384_bs16_160k_res640.yaml": ("swin_base_IN21k_384", ADE_RES640),
    f"ade20k/semantic-segmentation/{M2F}/swin/"
    "mask2former_swin_large_IN21k_384_bs16_160k_res640.yaml": ("swin_large_IN21k_384", ADE_RES640),
    # ADE20K panoptic
    f"ade20k/panoptic-segmentation/{M2F}/mask2former_R50_bs16_160k.yaml": ("R50", {}),
    f"ade20k/panoptic-segmentation/{M2F}/swin/mask2former_swin_large_IN21k_384_bs16_160k.yaml": (
        "swin_large_IN21k_384",
        Q200,
    ),
    # Mapillary Vistas
    f"mapillary-vistas/panoptic-segmentation/{M2F}/mask2former_R50_bs16_300k.yaml": ("R50", {}),
    f"mapillary-vistas/panoptic-segmentation/{M2F}/swin/"
    "mask2former_swin_large_IN21k_384_bs16_300k.yaml": ("swin_large_IN21k_384", Q200),
    f"mapillary-vistas/semantic-segmentation/{M2F}/mask2former_R50_bs16_300k.yaml": ("R50", {}),
    f"mapillary-vistas/semantic-segmentation/{M2F}/swin/"
    "mask2former_swin_large_IN21k_384_bs16_300k.yaml": ("swin_large_IN21k_384", {}),
}
# Cityscapes: the same six backbones for the three tasks; Swin-L uses 200 queries except semantic.
for _task in ("semantic", "panoptic", "instance"):
    _folder = f"cityscapes/{_task}-segmentation/{M2F}"
    OFFICIAL[f"{_folder}/mask2former_R50_bs16_90k.yaml"] = ("R50", {})
    OFFICIAL[f"{_folder}/mask2former_R101_bs16_90k.yaml"] = ("R101", {})
    for _size in ("tiny", "small", "base_IN21k_384"):
        OFFICIAL[f"{_folder}/swin/mask2former_swin_{_size}_bs16_90k.yaml"] = (f"swin_{_size}", {})
    OFFICIAL[f"{_folder}/swin/mask2former_swin_large_IN21k_384_bs16_90k.yaml"] = (
        "swin_large_IN21k_384",
        {} if _task == "semantic" else Q200,
    )


def test_official_table_covers_real_configs():
    """Every Mask2Former leaf for a real dataset is in OFFICIAL (so it is checked) and exists."""
    real = {
        _rel(p)
        for p in ALL_YAMLS
        if f"/{M2F}/" in _rel(p)
        and _rel(p).split("/")[0] in {"coco", "ade20k", "cityscapes", "mapillary-vistas"}
        and not p.name.startswith("Base-")
    }
    assert real == set(OFFICIAL), (sorted(real - set(OFFICIAL)), sorted(set(OFFICIAL) - real))


@pytest.mark.parametrize("rel", sorted(OFFICIAL))
def test_official_settings(rel: str):
    backbone, extra = OFFICIAL[rel]
    task = "/".join(rel.split("/")[:2])
    expected = {**COMMON, **TASKS[task], **BACKBONES[backbone], **extra}
    cfg = _load_cfg(CONFIG_ROOT / rel)
    wrong = {k: (_get(cfg, k), v) for k, v in expected.items() if _norm(_get(cfg, k)) != _norm(v)}
    assert not wrong, f"{rel}: key -> (ours, official): {wrong}"
