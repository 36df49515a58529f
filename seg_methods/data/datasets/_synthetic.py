"""Implementation of the embedded procedural dataset; the public entry point is ``synthetic.py``.

See ``seg_methods/data/datasets/synthetic.py`` for the description of the scenes, the files and
how to extend the generator. This module is what ``import seg_methods`` loads (so that
``python -m seg_methods.data.datasets.synthetic`` does not import its own module twice).

Shape shorthand: ``H, W`` image height and width; ``K`` number of Voronoi seeds.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from .panoptic_utils import (
    ids_to_rgb,
    instance_annotations_from_panoptic,
    load_panoptic_json,
    make_class_hierarchy,
    segments_from_panoptic,
)

logger = logging.getLogger(__name__)

# Bump when the scenes or files change in a way the source hash would not catch (it catches
# every edit of this file and of panoptic_utils.py anyway).
GENERATOR_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# Classes. Contiguous ids: things first (0..3), then stuff (4..7), like COCO panoptic.
# Dataset (json) category ids are contiguous id + 1 (0 is void in panoptic PNGs).
# ---------------------------------------------------------------------------------------------
THING_CLASSES = ("ellipse", "rectangle", "triangle", "star")  # class given by shape
STUFF_ONLY_CLASSES = ("stripes", "checker", "dots", "blobs")  # class given by texture
ALL_CLASSES = THING_CLASSES + STUFF_ONLY_CLASSES
NUM_THINGS = len(THING_CLASSES)
# Colours for visualisation only (the images use random colours).
CLASS_COLORS = (
    (220, 20, 60),
    (0, 130, 200),
    (255, 180, 0),
    (60, 180, 75),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)
# Two-level taxonomy above the 8 classes: class -> super-class -> {thing, stuff}.
SUPER_CLASSES = ("curved", "polygonal", "oriented", "isotropic")
CLASS_TO_SUPER = (0, 1, 1, 1, 2, 2, 3, 3)
ROOT_CLASSES = ("thing", "stuff")
SUPER_TO_ROOT = (0, 0, 1, 1)

LABEL_DIVISOR = 1000  # panoptic segment id = dataset category id * 1000 + instance index
IGNORE_LABEL = 255
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticConfig:
    """Every parameter of the generator (saved in ``params.json``; a change regenerates).

    Lengths are fractions of the image size unless the name ends in ``_px``.

    Attributes:
        num_train (int): number of training images.
        num_val (int): number of validation images.
        height (int): image height in pixels.
        width (int): image width in pixels.
        seed (int): base seed; image ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``.
        min_instances (int): minimum number of thing instances per image.
        max_instances (int): maximum number of thing instances per image.
        min_instance_area (float): minimum visible area of an instance (fraction of the image).
        max_instance_area (float): maximum area of an instance (fraction of the image).
        min_visible_ratio (float): an occluded instance keeps at least this fraction of its area.
        group_prob (float): probability that a new instance copies the class of an existing one
            and is placed against it (touching or overlapping it).
        min_inside_ratio (float): fraction of a shape that must lie inside the image.
        min_stuff_regions (int): minimum number of Voronoi seeds of the stuff layout.
        max_stuff_regions (int): maximum number of Voronoi seeds.
        boundary_warp (float): amplitude of the smooth warp that makes region borders irregular.
        texture_period (Tuple[float, float]): range of the texture period.
        min_texture_period_px (float): lower bound of the texture period in pixels.
        min_color_contrast (int): minimum L1 distance between the two colours of a texture.
        pixel_noise_std (float): std of the uniform noise added to the image (0-255 scale).
        jpeg_quality (int): JPEG quality of the images (4:4:4, no chroma subsampling).
    """

    num_train: int = 600
    num_val: int = 150
    height: int = 256
    width: int = 256
    seed: int = 0
    min_instances: int = 2
    max_instances: int = 8
    min_instance_area: float = 0.03
    max_instance_area: float = 0.30
    min_visible_ratio: float = 0.4
    group_prob: float = 0.5
    min_inside_ratio: float = 0.6
    min_stuff_regions: int = 3
    max_stuff_regions: int = 7
    boundary_warp: float = 0.08
    texture_period: Tuple[float, float] = (0.025, 0.055)
    min_texture_period_px: float = 4.0
    min_color_contrast: int = 150
    pixel_noise_std: float = 3.0
    jpeg_quality: int = 95

    def num_images(self, split: str) -> int:
        """Number of images of ``split`` ("train" or "val")."""
        return {"train": self.num_train, "val": self.num_val}[split]


class Scene(NamedTuple):
    """One generated scene, in memory.

    Attributes:
        image (np.ndarray): uint8 RGB image of shape (H, W, 3).
        panoptic (np.ndarray): int32 segment ids of shape (H, W) (``cat * 1000 + k``).
        regions (np.ndarray): int32 id of the finest GT region of shape (H, W): every connected
            Voronoi cell and every visible thing instance has its own id (from 1).
        segments_info (list[dict]): COCO panoptic segments (dataset category ids, ``isthing``).
        instance_classes (list[int]): contiguous class of each instance, in painting order.
        instance_full_areas (list[int]): area (pixels, inside the image) of each instance before
            occlusion.
    """

    image: np.ndarray
    panoptic: np.ndarray
    regions: np.ndarray
    segments_info: List[Dict]
    instance_classes: List[int]
    instance_full_areas: List[int]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _bbox_slices(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """``(y0, x0, h, w)`` of the tight box of a non-empty boolean mask (H, W)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


@functools.lru_cache(maxsize=4)
def _pixel_grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Read-only pixel-centre coordinates ``(xs, ys)``, each (H, W) float32."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def _smooth_noise(rng: np.random.Generator, h: int, w: int, feature_px: float) -> np.ndarray:
    """Smooth random field of shape (H, W), unit std, features about ``feature_px`` wide."""
    gh = max(2, int(math.ceil(h / feature_px)) + 1)
    gw = max(2, int(math.ceil(w / feature_px)) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return field / max(float(field.std()), 1e-6)


def _random_color_pair(
    rng: np.random.Generator, min_contrast: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Two uniformly random RGB colours at L1 distance >= ``min_contrast``."""
    while True:
        c = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        if np.abs(c[0] - c[1]).sum() >= min_contrast:
            return c[0], c[1]


def _soft(v: np.ndarray, gain: float) -> np.ndarray:
    """Anti-aliased step: 0 for v << 0, 1 for v >> 0, linear over ~1/gain around 0."""
    return np.clip(0.5 + v * gain, 0.0, 1.0)


def _texture_weight(
    stuff_idx: int, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, period: float
) -> np.ndarray:
    """Blend weight in [0, 1] of shape (H, W) between the two colours of a stuff texture.

    The class is encoded only by the pattern: 0 stripes, 1 checkerboard, 2 dot lattice,
    3 irregular blobs. Orientation, period and phase are random.
    """
    theta = rng.uniform(0.0, math.pi)
    ct, st = math.cos(theta), math.sin(theta)
    u = (xs * ct + ys * st) / period + rng.uniform(0.0, 1.0)
    # Gain so that the 0 -> 1 transition spans about one pixel (|d sin(2 pi u)/dx| <= 2 pi/period).
    gain = max(1.0, period / (2.0 * math.pi))
    if stuff_idx == 0:  # stripes
        return _soft(np.sin(2.0 * math.pi * u), gain)
    v = (-xs * st + ys * ct) / period + rng.uniform(0.0, 1.0)
    if stuff_idx == 1:  # checkerboard
        return _soft(np.sin(2.0 * math.pi * u) * np.sin(2.0 * math.pi * v), gain)
    if stuff_idx == 2:  # dots on a rotated square lattice (spacing 1.5 periods)
        spacing = 1.5
        du = np.mod(u / spacing, 1.0) - 0.5
        dv = np.mod(v / spacing, 1.0) - 0.5
        dist_px = np.sqrt(du * du + dv * dv) * spacing * period
        radius_px = rng.uniform(0.22, 0.32) * spacing * period
        return np.clip(radius_px - dist_px + 0.5, 0.0, 1.0)
    # blobs: thresholded smooth noise
    h, w = xs.shape
    field = _smooth_noise(rng, h, w, 1.2 * period)
    return _soft(field, 3.0)


def _stuff_layout(
    cfg: SyntheticConfig, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray
) -> Tuple[np.ndarray, int]:
    """Irregular Voronoi tiling: returns the cell index map (H, W) int32 and the number of cells."""
    h, w = xs.shape
    k = int(rng.integers(cfg.min_stuff_regions, cfg.max_stuff_regions + 1))
    seeds = rng.uniform(0.0, 1.0, size=(k, 2)) * np.array([w, h], dtype=np.float64)
    amp = cfg.boundary_warp * min(h, w)
    feature = 0.35 * min(h, w)
    wx = xs + amp * _smooth_noise(rng, h, w, feature)
    wy = ys + amp * _smooth_noise(rng, h, w, feature)
    # Nearest seed of every warped pixel coordinate, one seed at a time (no (K, H, W) array).
    best = np.full((h, w), np.inf, dtype=np.float32)
    cells = np.zeros((h, w), dtype=np.int32)
    for i, (sx, sy) in enumerate(seeds.astype(np.float32)):
        d2 = (wx - sx) ** 2 + (wy - sy) ** 2
        closer = d2 < best
        best = np.where(closer, d2, best)
        cells[closer] = i
    return cells, k


def _shape_polygon(cls: int, rng: np.random.Generator, area_px: float) -> Optional[np.ndarray]:
    """Polygon (N, 2) centred at 0 with the requested area; None for the ellipse (drawn exactly)."""
    if cls == 1:  # rectangle
        q = rng.uniform(0.35, 1.0)
        w = math.sqrt(area_px / q)
        h = q * w
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64) / 2.0
    elif cls == 2:  # triangle with no very acute angle
        gaps = 2.0 * math.pi / 3.0 + rng.uniform(-0.6, 0.6, size=3)
        angles = np.cumsum(gaps / gaps.sum() * 2.0 * math.pi)
        radii = rng.uniform(0.9, 1.1, size=3)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif cls == 3:  # five-pointed star
        inner = rng.uniform(0.38, 0.5)
        angles = np.arange(10) * math.pi / 5.0
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        return None
    # Shoelace area, then scale to the requested area.
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return pts * math.sqrt(area_px / area)


def _rasterize_shape(
    cls: int,
    rng: np.random.Generator,
    center: np.ndarray,
    area_px: float,
    xs: np.ndarray,
    ys: np.ndarray,
) -> np.ndarray:
    """Boolean mask (H, W) of a thing of class ``cls`` (random rotation and aspect)."""
    h, w = xs.shape
    phi = rng.uniform(0.0, 2.0 * math.pi)
    cp, sp = math.cos(phi), math.sin(phi)
    pts = _shape_polygon(cls, rng, area_px)
    if pts is None:  # ellipse: exact test on the pixel grid
        q = rng.uniform(0.5, 1.0)
        a = math.sqrt(area_px / (math.pi * q))
        b = q * a
        dx = xs - center[0]
        dy = ys - center[1]
        u = (dx * cp + dy * sp) / a
        v = (-dx * sp + dy * cp) / b
        return (u * u + v * v) <= 1.0
    rot = np.array([[cp, -sp], [sp, cp]])
    pts = pts @ rot.T + center
    canvas = np.zeros((h, w), dtype=np.uint8)
    # Pixel centres are at integer coordinates; 4 fractional bits for sub-pixel accuracy.
    cv2.fillPoly(canvas, [np.round(pts * 16.0).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _place_instances(
    cfg: SyntheticConfig, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray
) -> Tuple[List[int], List[np.ndarray], List[np.ndarray]]:
    """Sample thing instances by rejection; returns classes, full masks and visible masks."""
    h, w = xs.shape
    hw = float(h * w)
    target = int(rng.integers(cfg.min_instances, cfg.max_instances + 1))
    min_area_px = cfg.min_instance_area * hw
    classes: List[int] = []
    full: List[np.ndarray] = []
    visible: List[np.ndarray] = []
    centers: List[np.ndarray] = []
    radii: List[float] = []
    attempts = 0
    max_attempts = 30 * target
    while len(classes) < target and (attempts < max_attempts or len(classes) < cfg.min_instances):
        attempts += 1
        if attempts > 100 * max_attempts:
            raise RuntimeError("could not place the minimum number of instances; check the config")
        # Log-uniform area between the bounds.
        area_frac = math.exp(
            rng.uniform(math.log(cfg.min_instance_area), math.log(cfg.max_instance_area))
        )
        area_px = area_frac * hw
        radius = math.sqrt(area_px / math.pi)
        if classes and rng.uniform() < cfg.group_prob:
            # Same class as an existing instance, placed against it: touching or overlapping.
            j = int(rng.integers(len(classes)))
            cls = classes[j]
            ang = rng.uniform(0.0, 2.0 * math.pi)
            dist = (radii[j] + radius) * rng.uniform(0.5, 1.0)
            center = centers[j] + dist * np.array([math.cos(ang), math.sin(ang)])
        else:
            cls = int(rng.integers(NUM_THINGS))
            center = rng.uniform(0.1, 0.9, size=2) * np.array([w, h], dtype=np.float64)
        mask = _rasterize_shape(cls, rng, center, area_px, xs, ys)
        area_in = float(np.count_nonzero(mask))
        if not (min_area_px <= area_in <= cfg.max_instance_area * hw):
            continue
        if area_in < cfg.min_inside_ratio * area_px:  # too much of the shape outside the image
            continue
        # The new shape is painted on top: every older instance must stay visible enough.
        new_visible = [vis & ~mask for vis in visible]
        ok = all(
            np.count_nonzero(nv) >= max(min_area_px, cfg.min_visible_ratio * np.count_nonzero(f))
            for nv, f in zip(new_visible, full)
        )
        if not ok:
            continue
        visible = new_visible + [mask]
        full.append(mask)
        classes.append(cls)
        centers.append(center)
        radii.append(radius)
    return classes, full, visible


def render_scene(cfg: SyntheticConfig, rng: np.random.Generator) -> Scene:
    """Draw one scene: textured stuff regions tiled by an irregular Voronoi layout, then 2-8
    random-colour thing shapes painted in z-order (later ones occlude earlier ones).

    Args:
        cfg (SyntheticConfig): generator parameters.
        rng (np.random.Generator): the only source of randomness (deterministic given its seed).

    Returns:
        Scene: image, panoptic ids, region ids and segment records.
    """
    h, w = cfg.height, cfg.width
    xs, ys = _pixel_grid(h, w)
    period_lo, period_hi = cfg.texture_period

    # --- stuff: Voronoi cells, each with a random texture class, colours, orientation, period
    cells, k = _stuff_layout(cfg, rng, xs, ys)
    cell_class = rng.integers(len(STUFF_ONLY_CLASSES), size=k)
    image = np.zeros((h, w, 3), dtype=np.float32)
    panoptic = np.zeros((h, w), dtype=np.int32)
    regions = np.zeros((h, w), dtype=np.int32)
    next_region = 1
    for c in range(k):
        cell = cells == c
        if not cell.any():
            continue
        # Work inside the cell's bounding box only.
        y0, x0, bh, bw = _bbox_slices(cell)
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        cell_box = cell[box]
        stuff_idx = int(cell_class[c])
        period = max(cfg.min_texture_period_px, rng.uniform(period_lo, period_hi) * min(h, w))
        weight = _texture_weight(stuff_idx, rng, xs[box], ys[box], period)[..., None]
        c0, c1 = _random_color_pair(rng, cfg.min_color_contrast)
        np.copyto(image[box], c0 * (1.0 - weight) + c1 * weight, where=cell_box[..., None])
        panoptic[cell] = (NUM_THINGS + stuff_idx + 1) * LABEL_DIVISOR
        # One region per connected component of the cell (superpixel-style ground truth).
        n_comp, comp = cv2.connectedComponents(cell_box.astype(np.uint8), connectivity=4)
        np.copyto(regions[box], comp + (next_region - 1), where=cell_box)
        next_region += n_comp - 1

    # --- things: random shapes with a random two-colour linear gradient fill
    classes, full, visible = _place_instances(cfg, rng, xs, ys)
    for idx, (cls, mask) in enumerate(zip(classes, full)):
        c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        ang = rng.uniform(0.0, 2.0 * math.pi)
        y0, x0, bh, bw = _bbox_slices(mask)
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        mask_box = mask[box]
        mys, mxs = np.nonzero(mask_box)
        cy, cx = mys.mean() + y0, mxs.mean() + x0
        extent = max(math.sqrt(float(mys.size)), 1.0)
        proj = (xs[box] - cx) * math.cos(ang) + (ys[box] - cy) * math.sin(ang)
        t = np.clip(0.5 + proj / extent, 0.0, 1.0)[..., None]
        np.copyto(image[box], c0 * (1.0 - t) + c1 * t, where=mask_box[..., None])
        panoptic[mask] = (cls + 1) * LABEL_DIVISOR + idx + 1
        regions[mask] = next_region + idx

    if cfg.pixel_noise_std > 0:
        # Zero-mean uniform noise with the requested std (much cheaper to draw than Gaussian).
        noise = rng.random(size=image.shape, dtype=np.float32) - 0.5
        image += noise * (cfg.pixel_noise_std * math.sqrt(12.0))
    np.rint(image, out=image)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)

    id_to_cat = {
        int(i): int(i) // LABEL_DIVISOR for i in np.flatnonzero(np.bincount(panoptic.ravel()))
    }
    isthing = {c + 1: c < NUM_THINGS for c in range(len(ALL_CLASSES))}
    segments = segments_from_panoptic(panoptic, id_to_cat, isthing)
    # Keep only the regions that are still visible, renumbered 1..R (in increasing old id).
    present = np.bincount(regions.ravel(), minlength=next_region + len(classes)) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.int32)  # old id -> rank among present ids (from 1)
    regions = lut[regions]
    return Scene(
        image=image,
        panoptic=panoptic,
        regions=regions,
        segments_info=segments,
        instance_classes=list(classes),
        instance_full_areas=[int(np.count_nonzero(m)) for m in full],
    )


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of the worker that draws it."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def split_paths(root: str, split: str) -> Dict[str, str]:
    """Paths of one split of a synthetic dataset rooted at ``root``."""
    return {
        "image_root": os.path.join(root, split),
        "panoptic_root": os.path.join(root, f"panoptic_{split}"),
        "sem_seg_root": os.path.join(root, f"panoptic_semseg_{split}"),
        "regions_root": os.path.join(root, f"regions_{split}"),
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}.json"),
        "instances_json": os.path.join(root, "annotations", f"instances_{split}.json"),
    }


def _categories_json() -> List[Dict]:
    return [
        {
            "id": i + 1,
            "name": name,
            "isthing": int(i < NUM_THINGS),
            "color": list(CLASS_COLORS[i]),
            "supercategory": SUPER_CLASSES[CLASS_TO_SUPER[i]],
        }
        for i, name in enumerate(ALL_CLASSES)
    ]


def _write_one(job: Tuple[str, Dict, str, int]) -> Tuple[Dict, Dict, List[Dict]]:
    """Generate and write image ``index`` of ``split``; return its json records."""
    root, cfg_dict, split, index = job
    cfg = SyntheticConfig(**cfg_dict)
    scene = render_scene(cfg, scene_rng(cfg.seed, split, index))
    paths = split_paths(root, split)
    stem = f"{index:06d}"
    image_id = index + 1
    Image.fromarray(scene.image).save(
        os.path.join(paths["image_root"], stem + ".jpg"), quality=cfg.jpeg_quality, subsampling=0
    )
    # Label PNGs with fast zlib settings: they compress well anyway.
    Image.fromarray(ids_to_rgb(scene.panoptic)).save(
        os.path.join(paths["panoptic_root"], stem + ".png"), compress_level=1
    )
    sem = (scene.panoptic // LABEL_DIVISOR - 1).astype(np.uint8)  # contiguous = dataset id - 1
    Image.fromarray(sem).save(os.path.join(paths["sem_seg_root"], stem + ".png"), compress_level=1)
    cv2.imwrite(os.path.join(paths["regions_root"], stem + ".png"), scene.regions.astype(np.uint16))

    image_entry = {
        "id": image_id,
        "file_name": stem + ".jpg",
        "height": cfg.height,
        "width": cfg.width,
    }
    segments = [{k: v for k, v in s.items() if k != "isthing"} for s in scene.segments_info]
    pan_entry = {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
    inst = instance_annotations_from_panoptic(
        scene.panoptic, segments, image_id, range(1, NUM_THINGS + 1), start_annotation_id=0
    )
    return image_entry, pan_entry, inst


def _source_hash() -> str:
    h = hashlib.sha1()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("_synthetic.py", "panoptic_utils.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _params(cfg: SyntheticConfig) -> Dict:
    # json round trip so tuples compare equal to the lists read back from disk
    return json.loads(
        json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "source_sha1": _source_hash(),
                "config": dataclasses.asdict(cfg),
            }
        )
    )


def is_generated(root: str, cfg: SyntheticConfig) -> bool:
    """Whether ``root`` holds a complete dataset made by this generator with ``cfg``."""
    try:
        with open(os.path.join(root, "params.json")) as f:
            return json.load(f) == _params(cfg)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(root: str):
    """Inter-process lock (per dataset root) so concurrent callers generate only once.

    The lock file lives in the temp folder and is removed on release; a waiter that wakes up on
    a removed file retries on the new one (inode check), so removal is race-free.
    """
    digest = hashlib.sha1(root.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"seg_methods_synthetic_{digest}.lock")
    try:
        import fcntl
    except ImportError:  # non-POSIX: no locking
        yield
        return
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        f.close()  # releases the lock


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def write_atomically(
    root: str, write: Callable[[str], None], params: Dict, done: Callable[[], bool]
) -> bool:
    """Write a generated dataset to ``root`` so that it is never seen half-written.

    Under an inter-process lock (:func:`_file_lock`): return False if ``done()`` (another
    process finished meanwhile); else remove leftovers of interrupted runs, ``write`` into a temp
    folder next to ``root``, add ``params.json`` (``params``), and swap the folder in with renames
    (a previous ``root`` is moved aside, then deleted). On any error the temp folder is removed.

    Args:
        root (str): absolute dataset folder.
        write (callable): ``write(folder)`` writes every file of the dataset into ``folder``.
        params (dict): written to ``params.json`` (what a later call compares).
        done (callable): whether an up-to-date dataset already exists at ``root``.

    Returns:
        bool: True if this call generated the dataset.
    """
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(root):
        if done():
            return False
        for leftover in os.listdir(parent):  # interrupted earlier runs (we hold the lock)
            if leftover.startswith(base + ".tmp-") or leftover.startswith(base + ".stale-"):
                shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=base + ".tmp-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            write(tmp)
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params, f, indent=2, sort_keys=True)
            stale = None
            if os.path.exists(root):
                stale = f"{root}.stale-{os.getpid()}"
                os.rename(root, stale)
            os.rename(tmp, root)
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def generate_synthetic_dataset(
    root: str,
    cfg: Optional[SyntheticConfig] = None,
    *,
    force: bool = False,
    num_workers: Optional[int] = None,
    verbose: bool = False,
) -> Dict:
    """Write the dataset to ``root`` unless an identical one (same params.json) is there.

    Files are written to a temporary sibling folder that is renamed to ``root`` at the end, so an
    interrupted run never leaves a half dataset under ``root``; ``params.json`` (generator version,
    source hash, config) is compared on the next call and a mismatch regenerates.

    Args:
        root (str): the dataset folder, e.g. ``$DETECTRON2_DATASETS/synthetic``.
        cfg (SyntheticConfig or None): parameters (default ``SyntheticConfig()``).
        force (bool): regenerate even if an identical dataset exists.
        num_workers (int or None): processes (default ``min(2, cpu_count)``); results do not
            depend on it.
        verbose (bool): log progress with ``print``.

    Returns:
        dict: ``{"root", "generated" (bool), "seconds", "num_images": {split: n}, "bytes"}``.
    """
    cfg = cfg or SyntheticConfig()
    root = os.path.abspath(root)
    t0 = time.perf_counter()
    counts = {s: cfg.num_images(s) for s in SPLITS}
    if not force and is_generated(root, cfg):
        return {"root": root, "generated": False, "seconds": 0.0, "num_images": counts}

    def write(tmp: str) -> None:
        _generate_into(tmp, cfg, num_workers or _default_workers(), verbose)

    def done() -> bool:  # another process finished meanwhile
        return not force and is_generated(root, cfg)

    if not write_atomically(root, write, _params(cfg), done):
        return {"root": root, "generated": False, "seconds": 0.0, "num_images": counts}
    seconds = time.perf_counter() - t0
    nbytes = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
    )
    logger.info(f"Generated synthetic dataset in {root} ({counts}) in {seconds:.1f} s")
    return {
        "root": root,
        "generated": True,
        "seconds": seconds,
        "num_images": counts,
        "bytes": nbytes,
    }


def _generate_into(root: str, cfg: SyntheticConfig, num_workers: int, verbose: bool) -> None:
    cfg_dict = dataclasses.asdict(cfg)
    categories = _categories_json()
    pool = None
    if num_workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(num_workers)
    try:
        for split in SPLITS:
            paths = split_paths(root, split)
            for key in ("image_root", "panoptic_root", "sem_seg_root", "regions_root"):
                os.makedirs(paths[key], exist_ok=True)
            os.makedirs(os.path.dirname(paths["panoptic_json"]), exist_ok=True)
            jobs = [(root, cfg_dict, split, i) for i in range(cfg.num_images(split))]
            t0 = time.perf_counter()
            if pool is not None:
                results = list(pool.imap(_write_one, jobs, chunksize=8))
            else:
                results = [_write_one(j) for j in jobs]
            images, pan_anns, inst_anns = [], [], []
            for image_entry, pan_entry, inst in results:
                images.append(image_entry)
                pan_anns.append(pan_entry)
                for ann in inst:
                    ann["id"] = len(inst_anns) + 1
                    inst_anns.append(ann)
            info = {
                "description": f"seg_methods synthetic dataset, {split} split",
                "version": GENERATOR_VERSION,
            }
            with open(paths["panoptic_json"], "w") as f:
                json.dump(
                    {
                        "info": info,
                        "images": images,
                        "annotations": pan_anns,
                        "categories": categories,
                    },
                    f,
                )
            with open(paths["instances_json"], "w") as f:
                json.dump(
                    {
                        "info": info,
                        "images": images,
                        "annotations": inst_anns,
                        "categories": categories[:NUM_THINGS],
                    },
                    f,
                )
            if verbose:
                print(
                    f"  {split}: {len(images)} images, {len(inst_anns)} thing instances "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def class_hierarchy() -> Dict:
    """The 3-level taxonomy (class -> super-class -> thing/stuff), see ``make_class_hierarchy``."""
    return make_class_hierarchy(
        [list(ALL_CLASSES), list(SUPER_CLASSES), list(ROOT_CLASSES)],
        [list(CLASS_TO_SUPER), list(SUPER_TO_ROOT)],
    )


def synthetic_metadata() -> Dict:
    """Class metadata shared by every synthetic dataset (Mask2Former's panoptic conventions)."""
    colors = [list(c) for c in CLASS_COLORS]
    return {
        "thing_classes": list(THING_CLASSES),
        "thing_colors": colors[:NUM_THINGS],
        # all classes, so that the semantic evaluator and the panoptic sem-seg use one label space
        "stuff_classes": list(ALL_CLASSES),
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(NUM_THINGS)},
        "stuff_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(ALL_CLASSES))},
        "ignore_label": IGNORE_LABEL,
        "label_divisor": LABEL_DIVISOR,
        "class_hierarchy": class_hierarchy(),
    }


def _load_panoptic(root: str, split: str, cfg: SyntheticConfig) -> List[Dict]:
    generate_synthetic_dataset(root, cfg)
    p = split_paths(root, split)
    return load_panoptic_json(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        synthetic_metadata(),
        extra_per_image={"regions_file_name": p["regions_root"]},
    )


def _load_sem_seg(root: str, split: str, cfg: SyntheticConfig) -> List[Dict]:
    return [
        {
            k: d[k]
            for k in (
                "file_name",
                "image_id",
                "height",
                "width",
                "sem_seg_file_name",
                "regions_file_name",
            )
        }
        for d in _load_panoptic(root, split, cfg)
    ]


def _load_instances(root: str, split: str, cfg: SyntheticConfig, name: str) -> List[Dict]:
    from detectron2.data.datasets import load_coco_json

    generate_synthetic_dataset(root, cfg)
    p = split_paths(root, split)
    return load_coco_json(p["instances_json"], p["image_root"], name)


def _register(name: str, func, metadata: Dict) -> None:
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, func)
    MetadataCatalog.get(name).set(**metadata)


def register_synthetic(
    name_prefix: str = "synthetic",
    root: Optional[str] = None,
    num_train: int = 600,
    num_val: int = 150,
    image_size: Union[int, Tuple[int, int]] = 256,
    seed: int = 0,
    *,
    generate: bool = False,
    num_workers: Optional[int] = None,
    **config_overrides,
) -> Dict[str, str]:
    """Register ``{prefix}_{panoptic,sem_seg,instance}_{train,val}`` (lazily generated).

    Registering writes nothing; the first ``DatasetCatalog.get`` of any of the six names generates
    the files (or reuses them when ``params.json`` matches). Re-registering a prefix replaces it.

    Args:
        name_prefix (str): prefix of the dataset names.
        root (str or None): dataset folder; default ``$DETECTRON2_DATASETS/<name_prefix>``.
        num_train (int): training images.
        num_val (int): validation images.
        image_size (int or (int, int)): square size or (height, width).
        seed (int): base seed.
        generate (bool): generate now instead of on first use.
        num_workers (int or None): processes used when generating now (default 2).
        **config_overrides: other :class:`SyntheticConfig` fields.

    Returns:
        dict[str, str]: ``{"root", "panoptic_train", "panoptic_val", "sem_seg_train",
        "sem_seg_val", "instance_train", "instance_val"}`` -> folder / registered names.
    """
    from .layout import datasets_root

    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    cfg = SyntheticConfig(
        num_train=num_train,
        num_val=num_val,
        height=height,
        width=width,
        seed=seed,
        **config_overrides,
    )
    root = os.path.abspath(root or os.path.join(datasets_root(), name_prefix))
    base_meta = synthetic_metadata()
    names = {"root": root}
    for split in SPLITS:
        p = split_paths(root, split)
        common = dict(
            image_root=p["image_root"],
            sem_seg_root=p["sem_seg_root"],
            regions_root=p["regions_root"],
            synthetic_config=dataclasses.asdict(cfg),
            **base_meta,
        )
        pan = f"{name_prefix}_panoptic_{split}"
        _register(
            pan,
            lambda r=root, s=split, c=cfg: _load_panoptic(r, s, c),
            dict(
                common,
                panoptic_root=p["panoptic_root"],
                panoptic_json=p["panoptic_json"],
                json_file=p["instances_json"],
                evaluator_type="coco_panoptic_seg",
            ),
        )
        sem = f"{name_prefix}_sem_seg_{split}"
        _register(
            sem,
            lambda r=root, s=split, c=cfg: _load_sem_seg(r, s, c),
            dict(common, evaluator_type="sem_seg"),
        )
        inst = f"{name_prefix}_instance_{split}"
        _register(
            inst,
            lambda r=root, s=split, c=cfg, n=inst: _load_instances(r, s, c, n),
            dict(
                common,
                panoptic_root=p["panoptic_root"],
                panoptic_json=p["panoptic_json"],
                json_file=p["instances_json"],
                evaluator_type="coco",
            ),
        )
        names[f"panoptic_{split}"] = pan
        names[f"sem_seg_{split}"] = sem
        names[f"instance_{split}"] = inst
    if generate:
        generate_synthetic_dataset(root, cfg, num_workers=num_workers)
    return names
