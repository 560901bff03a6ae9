"""Small ImageNet-shaped JPEG datasets made on the spot, for tests and loader benchmarks.

Each class has its own background hue, gradient direction and foreground shape, so a classifier
can learn something; random placement, size and pixel noise keep the JPEGs realistic (they do
not compress to nothing and every image decodes differently).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("ellipse", "rectangle", "triangle", "stripes")


def _rgb(hue: float, sat: float = 0.8, val: float = 0.9) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _make_image(cls: int, classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    hue = cls / classes
    # Background: a gradient from the class colour to a darker shade, along a class-specific angle.
    angle = np.pi * cls / classes + rng.normal(0, 0.1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0 = np.array(_rgb(hue), np.float32)
    c1 = np.array(_rgb(hue + 0.08, 0.6, 0.35), np.float32)
    img = (1 - t)[..., None] * c0 + t[..., None] * c1
    img += rng.normal(0, 12, img.shape)  # sensor-like noise so JPEG size is realistic
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    # Foreground: the class's shape in the complementary colour, random size and place.
    draw = ImageDraw.Draw(pil)
    fg = _rgb(hue + 0.5, 0.9, 1.0)
    s = int(min(w, h) * rng.uniform(0.3, 0.6))
    x0 = int(rng.uniform(0, w - s))
    y0 = int(rng.uniform(0, h - s))
    shape = _SHAPES[cls % len(_SHAPES)]
    if shape == "ellipse":
        draw.ellipse((x0, y0, x0 + s, y0 + s), fill=fg)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x0 + s, y0 + s // 2), fill=fg)
    elif shape == "triangle":
        draw.polygon([(x0, y0 + s), (x0 + s, y0 + s), (x0 + s // 2, y0)], fill=fg)
    else:
        for k in range(0, s, max(s // 6, 2)):
            draw.line((x0 + k, y0, x0 + k, y0 + s), fill=fg, width=max(s // 14, 1))
    return pil


def make_jpeg_imagefolder(
    root: str | Path,
    *,
    classes: int = 4,
    per_class: int = 8,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    val_per_class: int | None = None,
    quality: int = 90,
) -> Path:
    """Write ``root/{train,val}/<class>/*.jpg`` (ImageNet layout) and return ``root``.

    ``size`` is (width, height); every third image is portrait (size transposed), as in real
    data. ``val_per_class`` defaults to ``max(1, per_class // 4)``.
    """
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got {classes} and {per_class}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_val = max(1, per_class // 4) if val_per_class is None else val_per_class
    for split, n in (("train", per_class), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"c{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                wh = size if i % 3 != 2 else (size[1], size[0])
                _make_image(c, classes, wh, rng).save(d / f"{split}_{c:03d}_{i:05d}.jpg", quality=quality)
    return root
