"""Procedural scenes with pixel masks: the project's own "ImageNet" and its downstream tasks.

Nothing can be downloaded here, so the backbone is pretrained on generated multi-object scenes
(shapes and letters on cluttered, textured backgrounds; multi-label targets), and steering is
measured on fine-grained downstream tasks whose classes were never pretraining labels and whose
every image holds distractors: the label is decided by one object, and that object's mask is the
ground truth for "does the model look at what matters".

Every image is a pure function of (seed, split, task, index), so any slice is reproducible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from toast_core.data.base import LabeledImages

DATA_VERSION = "scenes-v3"
DEFAULT_SIZE = 96
SPLITS = {"train": 0, "val": 1, "test": 2}

SHAPES = ("circle", "square", "triangle", "heart", "bar", "cross", "ring", "crescent", "arrow", "half-disc")
LETTERS = ("A", "E", "F", "H", "K", "M", "R", "X")
SOURCE_CLASSES: tuple[str, ...] = SHAPES + tuple(f"letter-{c}" for c in LETTERS)

STAR_POINTS = (4, 5, 6, 7)
STAR_RATIOS = {"thin": 0.38, "fat": 0.62}
STAR_CLASSES = tuple(f"star{k}-{r}" for k in STAR_POINTS for r in STAR_RATIOS)
DIGITS = tuple("0123456789")
DIGIT_CLASSES = tuple(f"digit-{d}" for d in DIGITS)

MAX_ROTATION = 0.5  # radians; full rotation invariance is too much to learn from scratch in a CPU hour
NOISE_SCALE = 4.0  # sensor noise std in levels; a power of two keeps it equal to rng.normal's bit for bit
_TEXTURE_BANK_SIZE = 24
_TEXTURE_RES = 192
_GLYPH_RES = 64


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task: one deciding object (the label) among source-vocabulary distractors."""

    name: str
    classes: tuple[str, ...]
    description: str
    distractors: tuple[int, int] = (2, 4)
    size_range: tuple[float, float] = (0.3, 0.42)


TASKS: dict[str, TaskSpec] = {
    "stars": TaskSpec(
        "stars",
        STAR_CLASSES,
        "Which star? Number of points (4-7) and thin or fat arms, among shapes and letters.",
    ),
    "glyphs": TaskSpec(
        "glyphs",
        DIGIT_CLASSES,
        "Which digit? One digit among letters and shapes (letters were pretraining labels, digits not).",
    ),
}


@dataclass
class Scene:
    """One rendered scene: image (H, W, 3) uint8, object-index map (H, W) uint8 (0 = background)."""

    image: np.ndarray
    index_map: np.ndarray
    classes: list[str] = field(default_factory=list)
    visible: list[float] = field(default_factory=list)

    def mask_of(self, obj: int) -> np.ndarray:
        return self.index_map == (obj + 1)


# --- assets built once per process ---------------------------------------------------------------
def _font_path() -> str | None:
    """matplotlib's DejaVu Sans Bold, found without importing matplotlib (that import costs the app's
    cold start most of a second; `matplotlib.get_data_path()` is this same `mpl-data` folder)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("matplotlib")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return str(path) if path.is_file() else None
    except Exception:
        return None


@cache
def _glyph_mask(char: str) -> np.ndarray:
    """A centred, tightly cropped binary mask of a bold glyph (DejaVu Sans Bold shipped by matplotlib)."""
    path = _font_path()
    font = ImageFont.truetype(path, 56) if path else ImageFont.load_default(size=56)
    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((48, 48), char, fill=255, font=font, anchor="mm")
    arr = np.asarray(canvas)
    ys, xs = np.nonzero(arr > 127)
    crop = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
    return cv2.resize(square, (_GLYPH_RES, _GLYPH_RES), interpolation=cv2.INTER_AREA)


@lru_cache(maxsize=1)
def _texture_bank() -> np.ndarray:
    """Greyscale textures in [0, 1] (noise blobs, stripes, checks, dots, grain): shared, seeded."""
    rng = np.random.default_rng(1234)
    bank = np.empty((_TEXTURE_BANK_SIZE, _TEXTURE_RES, _TEXTURE_RES), np.float32)
    yy, xx = np.mgrid[0:_TEXTURE_RES, 0:_TEXTURE_RES].astype(np.float32)
    for i in range(_TEXTURE_BANK_SIZE):
        kind = i % 6
        if kind == 0:  # smooth blobs
            small = rng.random((6 + i % 5, 6 + i % 5)).astype(np.float32)
            t = cv2.resize(small, (_TEXTURE_RES, _TEXTURE_RES), interpolation=cv2.INTER_CUBIC)
        elif kind == 1:  # stripes
            ang = rng.uniform(0, math.pi)
            freq = rng.uniform(0.08, 0.3)
            t = 0.5 + 0.5 * np.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)))
        elif kind == 2:  # checks
            s = int(rng.integers(5, 14))
            t = (((xx // s) + (yy // s)) % 2).astype(np.float32)
        elif kind == 3:  # dots
            s = int(rng.integers(6, 14))
            t = (np.hypot(xx % s - s / 2, yy % s - s / 2) < s / 4).astype(np.float32)
        elif kind == 4:  # fine grain
            t = cv2.GaussianBlur(rng.random((_TEXTURE_RES, _TEXTURE_RES)).astype(np.float32), (0, 0), 1.2)
        else:  # waves
            t = 0.5 + 0.25 * (np.sin(xx * rng.uniform(0.05, 0.2)) + np.sin(yy * rng.uniform(0.05, 0.2)))
        t = t - t.min()
        bank[i] = t / max(float(t.max()), 1e-6)
    return bank


# --- geometry --------------------------------------------------------------------------------------
# Outlines are unit shapes scaled per object; the unit parts are cached (read-only), and the scaling
# does the very float ops the uncached formulas did, so the pixels stay those of DATA_VERSION.
@cache
def _directions(n: int, phase: float) -> tuple[np.ndarray, np.ndarray]:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.cos(a), np.sin(a)


@cache
def _star_directions(points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    return np.cos(a), np.sin(a), np.arange(2 * points) % 2 == 0


@cache
def _unit_heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2], axis=1)


def _regular(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    cos, sin = _directions(n, phase)
    return np.stack([r * cos, r * sin], axis=1)


def _star(points: int, ratio: float, r: float) -> np.ndarray:
    cos, sin, outer = _star_directions(points)
    radii = np.where(outer, r, r * ratio)
    return np.stack([radii * cos, radii * sin], axis=1)


def _polygon(kind: str, r: float) -> list[np.ndarray]:
    """Outline polygons (in object coordinates, centred) for the filled shapes."""
    if kind == "square":
        return [_regular(4, r * 1.05, -math.pi / 4)]
    if kind == "triangle":
        return [_regular(3, r * 1.1) + np.array([0.0, r * 0.15])]
    if kind == "heart":
        return [_unit_heart() * (r / 17)]
    if kind == "bar":
        return [np.array([[-r, -0.3 * r], [r, -0.3 * r], [r, 0.3 * r], [-r, 0.3 * r]])]
    if kind == "cross":
        w = r * 0.36
        return [
            np.array(
                [[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w], [w, r], [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w]]
            )
        ]
    if kind == "arrow":
        return [
            np.array(
                [[-r, -0.3 * r], [0.1 * r, -0.3 * r], [0.1 * r, -0.8 * r], [r, 0], [0.1 * r, 0.8 * r], [0.1 * r, 0.3 * r], [-r, 0.3 * r]]
            )
        ]
    raise KeyError(kind)


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _object_mask(kind: str, size: int, diameter: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """A filled binary mask (size, size) uint8 of one object placed at (cx, cy)."""
    mask = np.zeros((size, size), np.uint8)
    r = diameter / 2
    centre = np.array([cx, cy])
    if kind == "circle":
        cv2.ellipse(mask, (round(cx * 16), round(cy * 16)), (round(r * 16), round(r * 0.98 * 16)), 0, 0, 360, 1, -1, cv2.LINE_8, 4)
    elif kind == "ring":
        cv2.circle(mask, (round(cx * 16), round(cy * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
        cv2.circle(mask, (round(cx * 16), round(cy * 16)), round(r * 0.55 * 16), 0, -1, cv2.LINE_8, 4)
    elif kind == "crescent":
        cv2.circle(mask, (round(cx * 16), round(cy * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
        off = _rotate(np.array([[r * 0.45, -r * 0.15]]), angle)[0] + centre
        cv2.circle(mask, (round(off[0] * 16), round(off[1] * 16)), round(r * 0.85 * 16), 0, -1, cv2.LINE_8, 4)
    elif kind == "half-disc":
        deg = math.degrees(angle)
        cv2.ellipse(mask, (round(cx * 16), round(cy * 16)), (round(r * 16), round(r * 16)), deg, 0, 180, 1, -1, cv2.LINE_8, 4)
    elif kind.startswith("star"):
        points, ratio = int(kind[4]), STAR_RATIOS[kind.split("-")[1]]
        pts = _rotate(_star(points, ratio, r * 1.1), angle) + centre
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    elif kind.startswith(("letter-", "digit-")):
        glyph = _glyph_mask(kind.split("-", 1)[1])
        scale = diameter / _GLYPH_RES
        m = cv2.getRotationMatrix2D((_GLYPH_RES / 2, _GLYPH_RES / 2), math.degrees(angle), scale)
        m[:, 2] += np.array([cx, cy]) - _GLYPH_RES / 2
        warped = cv2.warpAffine(glyph, m, (size, size), flags=cv2.INTER_LINEAR)
        mask = (warped > 110).astype(np.uint8)
    else:
        for poly in _polygon(kind, r):
            pts = _rotate(poly, angle) + centre
            cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask


# --- painting --------------------------------------------------------------------------------------
def _hsv_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(0, 180)
    hsv = np.uint8([[[h, rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    bank = _texture_bank()
    t = bank[int(rng.integers(len(bank)))]
    if size > _TEXTURE_RES:  # large renders stretch the bank instead of cropping it
        t = cv2.resize(t, (size, size), interpolation=cv2.INTER_LINEAR)
    y, x = rng.integers(0, t.shape[0] - size + 1, size=2)
    crop = t[y : y + size, x : x + size]
    return crop if rng.random() < 0.5 else crop.T


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c1 = _hsv_colour(rng, (0.05, 0.5), (0.2, 0.9))
    c2 = _hsv_colour(rng, (0.05, 0.5), (0.2, 0.9))
    t = _texture_crop(rng, size)
    one_minus_t = 1 - t  # per channel, then interleaved: the float32 ops of c1 * (1 - t) + c2 * t, 5x faster
    img = cv2.merge([c1[k] * one_minus_t + c2[k] * t for k in range(3)])
    # clutter: faint strokes and blobs that are not objects
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(_hsv_colour(rng, (0.0, 0.4), (0.15, 0.95)).tolist())
        p1 = tuple(rng.integers(0, size, 2).tolist())
        if rng.random() < 0.6:
            p2 = tuple(rng.integers(0, size, 2).tolist())
            cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)))
        else:
            cv2.circle(img, p1, int(rng.integers(2, 5)), colour, -1)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill an object: a saturated colour, sometimes textured, always contrasting with its surround."""
    x0, y0, w, h = cv2.boundingRect(mask)
    if w == 0:
        return
    y1, x1 = y0 + h, x0 + w
    region = img[y0:y1, x0:x1]
    m = mask[y0:y1, x0:x1].astype(bool)
    under = np.add.reduce(region[m], axis=0)  # = .mean(axis=0) bit for bit (the same float32 sum), cheaper
    under /= np.count_nonzero(m)
    colour = _hsv_colour(rng, (0.55, 1.0), (0.55, 1.0))
    if np.abs(colour - under).sum() < 150:  # push away from the background
        colour = np.clip(255 - under + rng.normal(0, 20, 3), 0, 255).astype(np.float32)
    if rng.random() < 0.35:
        t = _texture_crop(rng, max(y1 - y0, x1 - x0))[: y1 - y0, : x1 - x0]
        region[m] = colour * (0.75 + 0.25 * t[m])[:, None]  # only the object's pixels, same float ops
    else:
        region[m] = colour


def _place(
    rng: np.random.Generator,
    size: int,
    diameter: float,
    taken: list[tuple[float, float, float]],
    max_overlap: float = 0.55,
) -> tuple[float, float]:
    """A centre inside the image whose distance to earlier objects keeps occlusion partial."""
    r = diameter / 2
    for _ in range(30):
        cx, cy = rng.uniform(r, size - r, size=2)
        if all(math.hypot(cx - x, cy - y) > max_overlap * (r + rr) for x, y, rr in taken):
            return float(cx), float(cy)
    return float(cx), float(cy)


def render_scene(rng: np.random.Generator, kinds: list[str], diameters: list[float], size: int) -> Scene:
    """Draw objects in order (later ones occlude earlier ones) on a textured, cluttered background."""
    img = _background(rng, size)
    index_map = np.zeros((size, size), np.uint8)
    full_area = []
    taken: list[tuple[float, float, float]] = []
    for i, (kind, diameter) in enumerate(zip(kinds, diameters, strict=True)):
        cx, cy = _place(rng, size, diameter, taken)
        taken.append((cx, cy, diameter / 2))
        mask = _object_mask(kind, size, diameter, rng.uniform(-MAX_ROTATION, MAX_ROTATION), cx, cy)
        _paint(img, mask, rng)
        index_map[mask.astype(bool)] = i + 1
        full_area.append(max(cv2.countNonZero(mask), 1))
    if rng.random() < 0.5:  # mild sensor noise and blur, so edges are not trivially clean
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
    # = rng.normal(0, NOISE_SCALE, shape) bit for bit (loc + scale * z), 30% faster
    noise = rng.standard_normal(img.shape).astype(np.float32)
    noise *= NOISE_SCALE
    noise += img
    img = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
    counts = np.bincount(index_map.ravel(), minlength=len(kinds) + 1)
    visible = [float(counts[i + 1] / full_area[i]) for i in range(len(kinds))]
    return Scene(image=img, index_map=index_map, classes=list(kinds), visible=visible)


# --- source scenes (pretraining) --------------------------------------------------------------------
VISIBLE_FOR_LABEL = 0.35


def _rng(seed: int, split: str, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], stream, index])


def source_scene(seed: int, split: str, index: int, size: int = DEFAULT_SIZE) -> tuple[Scene, np.ndarray]:
    """A multi-object source scene and its multi-hot target over SOURCE_CLASSES."""
    rng = _rng(seed, split, 0, index)
    n = int(rng.integers(1, 4))
    kinds = [SOURCE_CLASSES[int(c)] for c in rng.integers(0, len(SOURCE_CLASSES), n)]
    diameters = [float(rng.uniform(0.26, 0.5) * size) for _ in kinds]
    scene = render_scene(rng, kinds, diameters, size)
    target = np.zeros(len(SOURCE_CLASSES), np.float32)
    for kind, vis in zip(scene.classes, scene.visible, strict=True):
        if vis >= VISIBLE_FOR_LABEL:
            target[SOURCE_CLASSES.index(kind)] = 1.0
    return scene, target


def source_batch(seed: int, split: str, start: int, n: int, size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (n, 3, H, W) uint8, multi-hot targets (n, C) float, union object masks (n, H, W) bool."""
    images, targets, class_maps = source_batch_dense(seed, split, start, n, size)
    return images, targets, class_maps > 0


def source_batch_dense(seed: int, split: str, start: int, n: int, size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `source_batch`, but with per-pixel class maps (n, H, W) uint8: 0 = background, c + 1 = class c."""
    images = np.empty((n, size, size, 3), np.uint8)
    targets = np.empty((n, len(SOURCE_CLASSES)), np.float32)
    class_maps = np.empty((n, size, size), np.uint8)
    for j in range(n):
        scene, target = source_scene(seed, split, start + j, size)
        lut = np.array([0] + [SOURCE_CLASSES.index(k) + 1 for k in scene.classes], np.uint8)
        images[j], targets[j], class_maps[j] = scene.image, target, lut[scene.index_map]
    return _channels_first(images), torch.from_numpy(targets), torch.from_numpy(class_maps)


def _channels_first(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) -> (N, 3, H, W) uint8; numpy's copy is 5x faster than torch's for uint8."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def source_stream(seed: int, split: str = "train", size: int = DEFAULT_SIZE):
    """A batch source for the training loop: (step, batch_size, generator) -> (images, targets)."""

    def batch(step: int, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets, _ = source_batch(seed, split, step * batch_size, batch_size, size)
        return images, targets

    return batch


# --- downstream tasks ----------------------------------------------------------------------------
def task_scene(
    task: str, seed: int, split: str, index: int, label: int, size: int = DEFAULT_SIZE,
    distractors: tuple[int, int] | None = None,
) -> Scene:
    """A downstream scene: the deciding object of class `label` plus source distractors.

    `distractors` overrides the task's (min, max) count; (0, 0) is the no-distractor control, the
    same deciding objects on the same cluttered backgrounds with nothing to confuse them with."""
    spec = TASKS[task]
    rng = _rng(seed, split, 1 + list(TASKS).index(task), index)
    low, high = spec.distractors if distractors is None else distractors
    n_dis = int(rng.integers(low, high + 1))
    kinds = [SOURCE_CLASSES[int(c)] for c in rng.integers(0, len(SOURCE_CLASSES), n_dis)]
    diameters = [float(rng.uniform(0.22, 0.34) * size) for _ in kinds]
    slot = int(rng.integers(0, n_dis + 1))
    kinds.insert(slot, spec.classes[label])
    diameters.insert(slot, float(rng.uniform(*spec.size_range) * size))
    # the deciding object must stay mostly visible: draw it last if an occluder would hide it
    scene = render_scene(rng, kinds, diameters, size)
    if scene.visible[slot] < 0.7:
        kinds.append(kinds.pop(slot))
        diameters.append(diameters.pop(slot))
        slot = len(kinds) - 1
        scene = render_scene(rng, kinds, diameters, size)
    relabel = np.full(len(kinds) + 1, 2, np.uint8)  # 0 background, 1 the deciding object, 2 distractors
    relabel[0], relabel[slot + 1] = 0, 1
    scene.index_map = relabel[scene.index_map]
    return scene


def make_task_split(
    task: str, split: str, per_class: int, seed: int = 0, size: int = DEFAULT_SIZE,
    distractors: tuple[int, int] | None = None,
) -> LabeledImages:
    """A balanced split of a downstream task; masks are the deciding object, objects every object.
    `distractors` overrides the task's count ((0, 0): the no-distractor control)."""
    if task not in TASKS:
        raise KeyError(f"Unknown task '{task}'; built-in tasks are {', '.join(TASKS)}.")
    if split not in SPLITS:
        raise KeyError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    spec = TASKS[task]
    n = per_class * len(spec.classes)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    objects = np.empty((n, size, size), bool)
    labels = np.arange(n) % len(spec.classes)
    for i in range(n):
        scene = task_scene(task, seed, split, i, int(labels[i]), size, distractors)
        images[i], masks[i], objects[i] = scene.image, scene.index_map == 1, scene.index_map > 0
    return LabeledImages(
        images=_channels_first(images),
        labels=torch.from_numpy(labels).long(),
        class_names=list(spec.classes),
        masks=torch.from_numpy(masks),
        meta={"task": task, "split": split, "seed": seed, "per_class": per_class, "data_version": DATA_VERSION,
              **({} if distractors is None else {"distractors": list(distractors)})},
        objects=torch.from_numpy(objects),
    )


def export_imagefolder(task: str, out_dir: str | Path, per_class: int, seed: int = 0, splits: tuple[str, ...] = ("train", "val", "test"), size: int = DEFAULT_SIZE) -> Path:
    """Write split/class/NNNNN.png, masks/split/class/NNNNN.png and metadata.json for use elsewhere."""
    root = Path(out_dir)
    records = []
    for split in splits:
        data = make_task_split(task, split, per_class, seed, size)
        for i in range(len(data)):
            cls = data.class_names[int(data.labels[i])]
            rel = Path(split) / cls / f"{i:05d}.png"
            for base, arr in ((root, data.images[i].permute(1, 2, 0).numpy()), (root / "masks", data.masks[i].numpy().astype(np.uint8) * 255)):
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(base / rel)
            records.append({"image": str(rel), "mask": str(Path("masks") / rel), "label": cls, "split": split})
    meta = {"task": task, "description": TASKS[task].description, "classes": list(TASKS[task].classes), "seed": seed, "per_class": per_class, "size": size, "data_version": DATA_VERSION, "images": records}
    (root / "metadata.json").write_text(json.dumps(meta, indent=1))
    return root
