"""The loss curve as an RGB image (numpy, no plotting library), and a minimal PNG writer.

Handles every LOSS_MAP a run can produce: one value, a constant loss, NaN/Inf entries (drawn
as gaps), extra series beside ``"loss"`` (a validation series of (step, value) pairs), and a log scale (non-positive values skipped).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Mapping, Sequence

import numpy as np

# 5x7 bitmap glyphs, one string of 7 rows of 5 bits per character.
_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", "e": "00000 00000 01110 10001 11111 10000 01110",
    "s": "00000 00000 01111 10000 01110 00001 11110", "t": "01000 01000 11100 01000 01000 01001 00110",
    "p": "00000 00000 11110 10001 11110 10000 10000", "l": "01100 00100 00100 00100 00100 00100 01110",
    "o": "00000 00000 01110 10001 10001 10001 01110", "g": "00000 01111 10001 10001 01111 00001 01110",
    "r": "00000 00000 10110 11001 10000 10000 10000", "a": "00000 00000 01110 00001 01111 10001 01111",
    "w": "00000 00000 10001 10001 10101 10101 01010", "m": "00000 00000 11010 10101 10101 10001 10001",
    "h": "10000 10000 10110 11001 10001 10001 10001", "d": "00001 00001 01101 10011 10001 10001 01111",
    "n": "00000 00000 10110 11001 10001 10001 10001", "i": "00100 00000 01100 00100 00100 00100 01110",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "x": "00000 00000 10001 01010 00100 01010 10001", " ": "00000 00000 00000 00000 00000 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111", "/": "00001 00010 00010 00100 01000 01000 10000",
    "N": "10001 11001 10101 10011 10001 10001 10001", "A": "01110 10001 10001 11111 10001 10001 10001",
    "?": "01110 10001 00001 00110 00100 00000 00100",
    "b": "10000 10000 10110 11001 10001 10001 11110", "c": "00000 00000 01110 10000 10000 10001 01110",
    "f": "00110 01001 01000 11100 01000 01000 01000", "j": "00010 00000 00110 00010 00010 10010 01100",
    "k": "10000 10000 10010 10100 11000 10100 10010", "q": "00000 00000 01101 10011 01111 00001 00001",
    "u": "00000 00000 10001 10001 10001 10011 01101", "v": "00000 00000 10001 10001 10001 01010 00100",
    "y": "00000 00000 10001 10001 01111 00001 01110", "z": "00000 00000 11111 00010 00100 01000 11111",
    "B": "11110 10001 10001 11110 10001 10001 11110", "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100", "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000", "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001", "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100", "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111", "M": "10001 11011 10101 10101 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ":": "00000 01100 01100 00000 01100 01100 00000", "=": "00000 00000 11111 00000 11111 00000 00000",
    ",": "00000 00000 00000 00000 01100 00100 01000", "[": "01110 01000 01000 01000 01000 01000 01110",
    "]": "01110 00010 00010 00010 00010 00010 01110",
}
_BITMAPS = {
    ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)
    for ch, rows in _GLYPHS.items()
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
WHITE, BLACK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
LEFT, RIGHT, TOP, BOTTOM = 78, 16, 30, 40  # margins around the plot area, in pixels


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing); NaN passes through."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm if norm > 0 else v)
    return out


def _text(img: np.ndarray, x: int, y: int, text: str, color, scale: int = 1) -> None:
    for i, ch in enumerate(text):
        glyph = _BITMAPS.get(ch, _BITMAPS["?"])
        if scale > 1:
            glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        gx = x + i * 6 * scale
        h, w = glyph.shape
        region = img[y:y + h, gx:gx + w]
        region[glyph[: region.shape[0], : region.shape[1]]] = color


def _line(img: np.ndarray, p0, p1, color, width: int = 2) -> None:
    (x0, y0), (x1, y1) = p0, p1
    n = int(max(abs(x1 - x0), abs(y1 - y0), 1)) * 2
    xs = np.linspace(x0, x1, n + 1).round().astype(int)
    ys = np.linspace(y0, y1, n + 1).round().astype(int)
    h, w = img.shape[:2]
    for dx in range(width):
        for dy in range(width):
            xx, yy = np.clip(xs + dx - width // 2, 0, w - 1), np.clip(ys + dy - width // 2, 0, h - 1)
            img[yy, xx] = color


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")
    return f"{v:.4g}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    if not span > 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / count))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= count:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _series(loss_map: Mapping[str, Sequence[float]]) -> dict[str, list[tuple[float, float]]]:
    """Each series of a LOSS_MAP as (step, value) points: a list of numbers (or 0-d tensors,
    or a 1-d tensor) is one value per step from 1; a list of (step, value) pairs (a
    validation series) gives its own steps."""
    out = {}
    for name, values in (loss_map or {}).items():
        if hasattr(values, "tolist"):
            values = values.tolist()
        if isinstance(values, (str, bytes)):
            continue  # not a numeric series (e.g. a note stored beside the losses)
        if isinstance(values, (int, float)):
            values = [values]
        try:
            if values and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):
                points = [(float(x), float(v)) for x, v in values]
            else:
                points = [(float(i + 1), float(v)) for i, v in enumerate(values)]
        except (TypeError, ValueError):
            continue  # not a numeric series (e.g. a note stored beside the losses)
        if points:
            out[str(name)] = points
    return out


def render_loss_plot(
    loss_map: Mapping[str, Sequence[float]],
    smoothing: float = 0.6,
    log_scale: bool = False,
    width: int = 768,
    height: int = 448,
) -> np.ndarray:
    """An ``[height, width, 3]`` uint8 image of every series in ``loss_map``.

    Each series is drawn raw (light) and, if ``smoothing`` > 0, EMA-smoothed (solid); the x
    axis is the step number (1-based), the y axis the value, both with labelled ticks. The
    legend gives each series' last finite value. NaN/Inf (and, on a log scale, values <= 0)
    are gaps; a value with no finite neighbour is drawn as a dot.
    """
    img = np.full((height, width, 3), WHITE, dtype=np.uint8)
    left, right, top, bottom = LEFT, RIGHT, TOP, BOTTOM
    pw, ph = width - left - right, height - top - bottom
    series = _series(loss_map)
    transform = (lambda v: math.log10(v) if v > 0 else float("nan")) if log_scale else (lambda v: v)
    finite = [transform(v) for points in series.values() for _, v in points]
    finite = [v for v in finite if math.isfinite(v)]
    steps = max((int(max(x for x, _ in points)) for points in series.values()), default=1)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.05
        lo, hi = lo - pad, hi + pad
    # One step: centre it (x from 0 to 2); otherwise step 1 sits on the y axis.
    x_lo, x_hi = (0, 2) if steps == 1 else (1, steps)

    def to_px(i: float, v: float) -> tuple[float, float]:
        return left + (i - x_lo) / (x_hi - x_lo) * pw, top + (hi - v) / (hi - lo) * ph

    for t in _nice_ticks(lo, hi, 6):
        _, y = to_px(1, t)
        img[int(y), left:left + pw] = GRID
        label = _fmt(10 ** t if log_scale else t)
        _text(img, max(2, left - 6 - 6 * len(label)), int(y) - 3, label, BLACK)
    for t in _nice_ticks(1, steps):
        if t != int(t):
            continue
        x, _ = to_px(int(t), lo)
        img[top:top + ph, int(x)] = GRID
        label = str(int(t))
        _text(img, int(x) - 3 * len(label), top + ph + 6, label, BLACK)
    img[top:top + ph + 1, left] = BLACK
    img[top + ph, left:left + pw + 1] = BLACK
    _text(img, left + pw // 2 - 12, height - 14, "step", BLACK)
    _text(img, 6, 8, "loss (log)" if log_scale else "loss", BLACK)
    if smoothing > 0 and series:
        note = f"light: raw, dark: smoothed ({smoothing:g})"
        _text(img, width - right - 6 * len(note), 8, note, BLACK)
    if not finite:
        message = "no loss values" if not series else "no finite loss values"
        _text(img, left + pw // 2 - 6 * len(message), top + ph // 2 - 7, message, BLACK, 2)

    legend = []
    for n, (name, points) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        light = tuple(int(c + (255 - c) * 0.6) for c in color)
        xs, vals = [x for x, _ in points], [v for _, v in points]
        curves = [(vals, light if smoothing > 0 else color, 1 if smoothing > 0 else 2)]
        if smoothing > 0:
            curves.append((ema(vals, smoothing), color, 2))
        for values, col, lw in curves:
            pts = [(x, transform(v)) for x, v in zip(xs, values)]
            for (i0, v0), (i1, v1) in zip(pts, pts[1:]):
                if math.isfinite(v0) and math.isfinite(v1):
                    _line(img, to_px(i0, v0), to_px(i1, v1), col, lw)
            for k, (i, v) in enumerate(pts):  # isolated points (a lone value, between gaps)
                neighbours = [pts[j][1] for j in (k - 1, k + 1) if 0 <= j < len(pts)]
                if math.isfinite(v) and not any(math.isfinite(u) for u in neighbours):
                    x, y = to_px(i, v)
                    img[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] = col
        last = next((v for v in reversed(vals) if math.isfinite(v)), None)
        legend.append((f"{name[:24]} {_fmt(last) if last is not None else 'nan'}", color))
    text_w = max((6 * len(t) for t, _ in legend), default=0)
    x0 = left + pw - text_w - 26
    for n, (text, color) in enumerate(legend):
        y = top + 8 + 12 * n
        img[max(0, y - 2):y + 9, max(0, x0 - 4):left + pw - 2] = WHITE
        img[y + 3:y + 5, x0:x0 + 14] = color
        _text(img, x0 + 18, y, text, color)
    return img


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 array as PNG (RFC 2083: IHDR, one IDAT, IEND)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
