"""High-resolution split of the embedded dataset, for mask refinement (CRM, CascadePSP, BIG).

BIG's protocol is binary: one object per record, its ground-truth mask and a coarse mask that the
refinement model repairs, scored by IoU and mBA (``seg_methods.evaluation.boundary``). This split
reproduces it procedurally, with the detail that a low-resolution segmenter loses:

* **one object per scene**: a filled, irregular body (smooth radial-noise polygon) with
  **holes** (1-4 discs and a slit cut out), **branches** (3-7 recursive polylines growing out of
  the body, each level thinner) and **rings** (1-3 circle outlines hung on branch tips). Thin
  parts are ``thin_px`` = 2-6 pixels wide at every image size;
* its colour: a random two-colour gradient, against a background of two other colours blended by
  smooth noise (L1 contrast between the mean colours >= ``min_contrast``), plus background clutter
  strokes (thin lines in background colours: not part of the object), soft 1-pixel edges,
  uniform pixel noise and JPEG compression;
* **coarse masks (val)**: stored, made deterministically (seeded) from the ground truth by the
  ``coarse_mask`` target generator's :func:`~seg_methods.data.target_generators.perturb_mask`:
  dilate or erode with a radius of ``coarse_radius`` pixels, shrink by a factor of
  ``coarse_downsample`` (2048 -> 128..256 pixels, the resolution of a semantic model's output),
  enlarge back bilinearly, threshold at 0.5. Thin parts vanish or swell, holes close, as in a
  low-resolution segmentation. (A coarse mask from one of our semantic models is an alternative:
  see ``datasets/README.md``.)

Splits: ``val`` holds ``num_val`` scenes of ``val_size`` x ``val_size`` (default 10 of
2048 x 2048) with stored coarse masks; ``train`` holds ``num_train`` other scenes (other seeds)
drawn by the same generator at ``train_size`` (default 64 of 512 x 512), without coarse masks:
CRM trains at low resolution (224 crops) on coarse masks made online by the ``refinement``
mapper, and the point of CRM is that the test resolution is far above the training one. Every
length is relative to the image size except the thin-part widths (pixels).

Files (under ``root``, default ``$DETECTRON2_DATASETS/synthetic_highres``)::

    params.json                 generator version, source hash, HighResConfig (a change regenerates)
    {train,val}/000000.jpg      images
    masks_{train,val}/000000.png  ground truth, 0 / 255
    coarse_val/000000.png         coarse masks, 0 / 255

Records: ``file_name, height, width, image_id, mask_file_name`` (+ ``coarse_mask_file_name`` in
val). Registered names: ``<prefix>_train``, ``<prefix>_val`` (``evaluator_type="refinement"``);
``synthetic_highres_{train,val}`` at import, generated on the first ``DatasetCatalog.get``.

Shape shorthand: ``S`` image side (square images).
"""

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..target_generators.coarse_mask import perturb_mask
from ._synthetic import write_atomically
from .layout import datasets_root

__all__ = [
    "HighResConfig",
    "HighResScene",
    "generate_synthetic_highres",
    "highres_metadata",
    "load_synthetic_highres",
    "register_synthetic_highres",
    "render_highres_scene",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class HighResConfig:
    """Every parameter of the high-resolution generator (saved in ``params.json``).

    Attributes:
        num_train (int): training scenes.
        num_val (int): validation scenes (with stored coarse masks).
        train_size (int): side of the training images (pixels).
        val_size (int): side of the validation images (pixels).
        seed (int): base seed; scene ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``.
        thin_px (tuple[int, int]): width range of branches and rings (pixels, any size).
        body_radius (tuple[float, float]): body radius range (fraction of the side).
        min_contrast (int): minimum L1 distance between the object's and the background's
            mean colours (0-255 per channel).
        num_clutter (tuple[int, int]): range of background clutter strokes.
        coarse_radius (tuple[int, int]): morphology radius of the coarse masks (pixels).
        coarse_downsample (tuple[int, int]): shrink factor of the coarse masks.
        pixel_noise_std (float): std of the uniform pixel noise (0-255).
        jpeg_quality (int): JPEG quality (4:4:4).
    """

    num_train: int = 64
    num_val: int = 10
    train_size: int = 512
    val_size: int = 2048
    seed: int = 0
    thin_px: Tuple[int, int] = (2, 6)
    body_radius: Tuple[float, float] = (0.12, 0.22)
    min_contrast: int = 150
    num_clutter: Tuple[int, int] = (3, 8)
    coarse_radius: Tuple[int, int] = (2, 8)
    coarse_downsample: Tuple[int, int] = (8, 16)
    pixel_noise_std: float = 3.0
    jpeg_quality: int = 92

    def num_images(self, split: str) -> int:
        """Number of scenes of ``split``."""
        return {"train": self.num_train, "val": self.num_val}[split]

    def size(self, split: str) -> int:
        """Image side of ``split``."""
        return {"train": self.train_size, "val": self.val_size}[split]


@dataclass
class HighResScene:
    """One scene in memory.

    Attributes:
        image (np.ndarray): (S, S, 3) uint8 RGB.
        mask (np.ndarray): (S, S) bool ground truth of the object.
        coarse (np.ndarray or None): (S, S) bool coarse mask (validation scenes).
    """

    image: np.ndarray
    mask: np.ndarray
    coarse: Optional[np.ndarray] = None


# ------------------------------------------------------------------------------------ drawing
def _smooth_noise(rng: np.random.Generator, size: int, feature_px: float) -> np.ndarray:
    """(S, S) float32 smooth random field in [0, 1], features about ``feature_px`` wide."""
    g = max(2, int(math.ceil(size / feature_px)) + 1)
    field = cv2.resize(rng.random((g, g), dtype=np.float32), (size, size), cv2.INTER_CUBIC)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _colors(rng: np.random.Generator, min_contrast: int) -> Tuple[np.ndarray, np.ndarray]:
    """(2, 3) object colours and (2, 3) background colours with distinct means."""
    while True:
        c = rng.integers(0, 256, size=(4, 3)).astype(np.float32)
        if np.abs(c[:2].mean(0) - c[2:].mean(0)).sum() >= min_contrast:
            return c[:2], c[2:]


def _body_polygon(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """(N, 2) irregular star-shaped polygon (radial noise of a few harmonics)."""
    n = 180
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 7):
        r += rng.uniform(0.0, 0.18 / (k - 1)) * np.cos(k * t + rng.uniform(0.0, 2.0 * math.pi))
    r = radius * np.clip(r, 0.5, None)
    return center + np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _draw_branch(
    canvas: np.ndarray,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    width: int,
    depth: int,
    tips: List[Tuple[np.ndarray, int]],
) -> None:
    """A wiggly polyline from ``start``, with sub-branches (thinner, shorter) down to depth 0."""
    n_seg = 6
    pts = [start]
    for _ in range(n_seg):
        angle += rng.normal(0.0, 0.25)
        pts.append(pts[-1] + length / n_seg * np.array([math.cos(angle), math.sin(angle)]))
    poly = np.round(np.stack(pts) * 16).astype(np.int32)
    cv2.polylines(canvas, [poly], False, 1, thickness=width, lineType=cv2.LINE_8, shift=4)
    tips.append((pts[-1], width))
    if depth <= 0:
        return
    for _ in range(int(rng.integers(1, 3))):
        j = int(rng.integers(2, n_seg))
        side = rng.choice([-1.0, 1.0])
        _draw_branch(
            canvas,
            rng,
            pts[j],
            angle + side * rng.uniform(0.4, 1.0),
            length * rng.uniform(0.4, 0.7),
            max(2, width - 1),
            depth - 1,
            tips,
        )


def _object_mask(cfg: HighResConfig, rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S) bool mask: body with holes, branches and rings (see the module docstring)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    radius = rng.uniform(*cfg.body_radius) * size
    center = rng.uniform(0.4, 0.6, size=2) * size
    cv2.fillPoly(
        mask,
        [np.round(_body_polygon(rng, center, radius) * 16).astype(np.int32)],
        1,
        cv2.LINE_8,
        shift=4,
    )
    # branches, grown from the body outline outwards
    tips: List[Tuple[np.ndarray, int]] = []
    thin_lo, thin_hi = cfg.thin_px
    for _ in range(int(rng.integers(3, 8))):
        a = rng.uniform(0.0, 2.0 * math.pi)
        start = center + 0.9 * radius * np.array([math.cos(a), math.sin(a)])
        width = int(rng.integers(thin_lo, thin_hi + 1))
        length = rng.uniform(0.12, 0.3) * size
        _draw_branch(mask, rng, start, a + rng.normal(0.0, 0.3), length, width, 2, tips)
    # rings hung on branch tips
    for k in rng.choice(len(tips), size=min(len(tips), int(rng.integers(1, 4))), replace=False):
        tip, _ = tips[int(k)]
        ring_r = rng.uniform(0.015, 0.05) * size
        a = rng.uniform(0.0, 2.0 * math.pi)
        c = tip + ring_r * np.array([math.cos(a), math.sin(a)])
        width = int(rng.integers(thin_lo, thin_hi + 1))
        cv2.circle(
            mask,
            tuple(int(v) for v in np.round(c * 16)),
            int(round(ring_r * 16)),
            1,
            thickness=width,
            lineType=cv2.LINE_8,
            shift=4,
        )
    # holes in the body: discs and one slit, all within 0.5 radius of the centre, inside the body
    # (whose outline never comes closer than 0.59 radius: harmonic amplitudes sum to < 0.41)
    for _ in range(int(rng.integers(1, 5))):
        hr = rng.uniform(0.06, 0.18) * radius
        rho, phi = rng.uniform(0.0, 0.3) * radius, rng.uniform(0.0, 2.0 * math.pi)
        hc = center + rho * np.array([math.cos(phi), math.sin(phi)])
        cv2.circle(
            mask,
            tuple(int(v) for v in np.round(hc * 16)),
            int(round(hr * 16)),
            0,
            thickness=-1,
            lineType=cv2.LINE_8,
            shift=4,
        )
    a = rng.uniform(0.0, math.pi)
    d = 0.4 * radius * np.array([math.cos(a), math.sin(a)])
    slit = np.round(np.stack([center - d, center + d]) * 16).astype(np.int32)
    cv2.polylines(
        mask,
        [slit],
        False,
        0,
        thickness=int(rng.integers(thin_lo, thin_hi + 1)),
        lineType=cv2.LINE_8,
        shift=4,
    )
    return mask.astype(bool)


def render_highres_scene(
    cfg: HighResConfig, rng: np.random.Generator, size: int, with_coarse: bool
) -> HighResScene:
    """Draw one scene (and its coarse mask when ``with_coarse``).

    Args:
        cfg (HighResConfig): parameters.
        rng (np.random.Generator): the only source of randomness.
        size (int): S, the image side.
        with_coarse (bool): also make the coarse mask (validation scenes).

    Returns:
        HighResScene: image, ground truth and (optionally) coarse mask.
    """
    mask = _object_mask(cfg, rng, size)
    fg_c, bg_c = _colors(rng, cfg.min_contrast)
    # background: two colours blended by smooth noise, plus clutter strokes in those colours
    # (in-place float32 arithmetic: a 2048 x 2048 x 3 temporary costs 50 MB and ~20 ms a pass)
    t = _smooth_noise(rng, size, 0.15 * size)[..., None]
    image = t * (bg_c[1] - bg_c[0])  # (S, S, 3) float32
    image += bg_c[0]
    clutter = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(cfg.num_clutter[0], cfg.num_clutter[1] + 1))):
        pts = rng.uniform(0.0, 1.0, size=(3, 2)) * size
        cv2.polylines(
            clutter,
            [np.round(pts * 16).astype(np.int32)],
            False,
            1,
            thickness=int(rng.integers(cfg.thin_px[0], cfg.thin_px[1] + 1)),
            lineType=cv2.LINE_8,
            shift=4,
        )
    stroke = bg_c[int(rng.integers(2))] * 0.7 + rng.integers(0, 256, 3).astype(np.float32) * 0.3
    image[clutter.astype(bool)] = stroke
    # object: linear two-colour gradient, soft one-pixel edge
    ang = rng.uniform(0.0, 2.0 * math.pi)
    u = np.arange(size, dtype=np.float32) / size - 0.5
    g = (u[:, None] * math.sin(ang) + 0.5) + u[None, :] * math.cos(ang)  # (S, S)
    np.clip(g, 0.0, 1.0, out=g)
    fg = g[..., None] * (fg_c[1] - fg_c[0])  # (S, S, 3)
    fg += fg_c[0]
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.6)[..., None]
    fg -= image
    fg *= alpha
    image += fg  # image * (1 - alpha) + fg * alpha
    if cfg.pixel_noise_std > 0:
        noise = rng.random(image.shape, dtype=np.float32)
        noise -= 0.5
        noise *= cfg.pixel_noise_std * math.sqrt(12.0)  # uniform, zero mean, that std
        image += noise
    image += 0.5  # round to nearest by truncation below
    np.clip(image, 0, 255, out=image)
    image = image.astype(np.uint8)
    coarse = None
    if with_coarse:
        coarse = perturb_mask(
            mask,
            rng,
            radius_range=cfg.coarse_radius,
            downsample_range=cfg.coarse_downsample,
            threshold=0.5,
        ).astype(bool)
    return HighResScene(image=image, mask=mask, coarse=coarse)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split`` (independent of the generation order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 100 + SPLITS.index(split), index]))


# -------------------------------------------------------------------------------------- files
def split_paths(root: str, split: str) -> Dict[str, str]:
    """Folders of ``split``: image_root, mask_root and (val) coarse_root."""
    paths = {
        "image_root": os.path.join(root, split),
        "mask_root": os.path.join(root, f"masks_{split}"),
    }
    if split == "val":
        paths["coarse_root"] = os.path.join(root, "coarse_val")
    return paths


def _params(cfg: HighResConfig) -> Dict:
    with open(os.path.abspath(__file__), "rb") as f:
        source = hashlib.sha1(f.read()).hexdigest()
    return json.loads(
        json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "source_sha1": source,
                "config": dataclasses.asdict(cfg),
            }
        )
    )


def _is_generated(root: str, cfg: HighResConfig) -> bool:
    try:
        with open(os.path.join(root, "params.json")) as f:
            return json.load(f) == _params(cfg)
    except (OSError, ValueError):
        return False


def _write_one(job: Tuple[str, Dict, str, int]) -> None:
    """Render and write scene ``index`` of ``split`` (a worker-process job)."""
    root, cfg_dict, split, index = job
    cfg = HighResConfig(**cfg_dict)
    paths = split_paths(root, split)
    scene = render_highres_scene(
        cfg, scene_rng(cfg.seed, split, index), cfg.size(split), split == "val"
    )
    stem = f"{index:06d}"
    Image.fromarray(scene.image).save(
        os.path.join(paths["image_root"], stem + ".jpg"), quality=cfg.jpeg_quality, subsampling=0
    )
    Image.fromarray(scene.mask.astype(np.uint8) * 255).save(
        os.path.join(paths["mask_root"], stem + ".png"), compress_level=1
    )
    if scene.coarse is not None:
        Image.fromarray(scene.coarse.astype(np.uint8) * 255).save(
            os.path.join(paths["coarse_root"], stem + ".png"), compress_level=1
        )


def _write_all(root: str, cfg: HighResConfig, num_workers: int) -> None:
    jobs = []
    for split in SPLITS:
        for p in split_paths(root, split).values():
            os.makedirs(p, exist_ok=True)
        jobs += [(root, dataclasses.asdict(cfg), split, i) for i in range(cfg.num_images(split))]
    jobs.sort(key=lambda j: j[2] != "val")  # the large scenes first: better load balance
    if num_workers <= 1:
        for job in jobs:
            _write_one(job)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_workers) as pool:
        list(pool.imap_unordered(_write_one, jobs))


def generate_synthetic_highres(
    root: str,
    cfg: Optional[HighResConfig] = None,
    *,
    force: bool = False,
    num_workers: Optional[int] = None,
) -> Dict:
    """Write the split to ``root`` unless an identical one (same ``params.json``) is there.

    Written to a temporary sibling folder renamed to ``root`` at the end (an interrupted run
    leaves no half dataset), under an inter-process lock.

    Args:
        root (str): dataset folder.
        cfg (HighResConfig or None): parameters (default ``HighResConfig()``).
        force (bool): regenerate even if up to date.
        num_workers (int or None): processes (default ``min(2, cpu_count)``); the files do not
            depend on it (each scene has its own seed).

    Returns:
        dict: ``{"root", "generated" (bool), "seconds"}``.
    """
    cfg = cfg or HighResConfig()
    root = os.path.abspath(root)
    if not force and _is_generated(root, cfg):
        return {"root": root, "generated": False, "seconds": 0.0}
    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        _write_all(tmp, cfg, num_workers or max(1, min(2, os.cpu_count() or 1)))

    def done() -> bool:  # another process finished meanwhile
        return not force and _is_generated(root, cfg)

    if not write_atomically(root, write, _params(cfg), done):
        return {"root": root, "generated": False, "seconds": 0.0}
    seconds = time.perf_counter() - t0
    logger.info(f"Generated the high-resolution synthetic split in {root} in {seconds:.1f} s")
    return {"root": root, "generated": True, "seconds": seconds}


# ------------------------------------------------------------------------------- registration
def highres_metadata() -> Dict:
    """Metadata of a binary refinement dataset (background / object, evaluator "refinement")."""
    return {
        "stuff_classes": ["background", "object"],
        "stuff_colors": [[0, 0, 0], [255, 255, 255]],
        "ignore_label": 255,
        "evaluator_type": "refinement",
    }


def load_synthetic_highres(root: str, split: str, cfg: HighResConfig) -> List[Dict]:
    """Records of ``split`` (generating the files on first use)."""
    generate_synthetic_highres(root, cfg)
    paths = split_paths(root, split)
    size = cfg.size(split)
    records = []
    for i in range(cfg.num_images(split)):
        stem = f"{i:06d}"
        r = {
            "file_name": os.path.join(paths["image_root"], stem + ".jpg"),
            "height": size,
            "width": size,
            "image_id": i,
            "mask_file_name": os.path.join(paths["mask_root"], stem + ".png"),
        }
        if "coarse_root" in paths:
            r["coarse_mask_file_name"] = os.path.join(paths["coarse_root"], stem + ".png")
        records.append(r)
    return records


def register_synthetic_highres(
    name_prefix: str = "synthetic_highres",
    root: Optional[str] = None,
    *,
    generate: bool = False,
    num_workers: Optional[int] = None,
    **config_overrides,
) -> Dict[str, str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` (files generated on first use).

    Args:
        name_prefix (str): prefix of the dataset names.
        root (str or None): dataset folder; default ``$DETECTRON2_DATASETS/<name_prefix>``.
        generate (bool): generate now instead of on first use.
        num_workers (int or None): processes used when generating now (default 2).
        **config_overrides: :class:`HighResConfig` fields (e.g. ``num_val=2, val_size=256``).

    Returns:
        dict[str, str]: ``{"root", "train", "val"}`` -> folder / registered names.
    """
    cfg = HighResConfig(**config_overrides)
    root = os.path.abspath(root or os.path.join(datasets_root(), name_prefix))
    names = {"root": root}
    for split in SPLITS:
        name = f"{name_prefix}_{split}"
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda r=root, s=split, c=cfg: load_synthetic_highres(r, s, c)
        )
        MetadataCatalog.get(name).set(
            highres_config=dataclasses.asdict(cfg), **split_paths(root, split), **highres_metadata()
        )
        names[split] = name
    if generate:
        generate_synthetic_highres(root, cfg, num_workers=num_workers)
    return names
