"""The trajectory proof's figures (bench/trajectory_proof.py): per arm, sample rows of every level decoded
with each level's own regions outlined, and the learning curves. PIL only: no plotting library."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def outline(image: np.ndarray, regions: np.ndarray, grid: int, colour=(255, 0, 0)) -> np.ndarray:
    """The image with the borders between tokens of different region ids drawn in `colour`."""
    out = image.copy()
    ids = np.asarray(regions).reshape(grid, grid)
    cell = image.shape[0] // grid
    for r in range(grid):
        for c in range(grid):
            y, x = r * cell, c * cell
            if c + 1 < grid and ids[r, c] != ids[r, c + 1]:
                out[y:y + cell, x + cell - 1:x + cell + 1] = colour
            if r + 1 < grid and ids[r, c] != ids[r + 1, c]:
                out[y + cell - 1:y + cell + 1, x:x + cell] = colour
    return out


def proof_figure(path: Path, kept: dict, grid: int, rows: int) -> None:
    """Per arm, `rows` samples: levels 0..L-1 decoded with the level's own regions outlined (the last
    level plain); flat: its final alone in the last column."""
    from PIL import Image, ImageDraw

    levels = max(k["images"].shape[1] for k in kept.values())   # flat keeps its final alone
    size = next(iter(kept.values()))["images"].shape[2]
    pad, label_w = 2, 150
    blocks = []
    for name, k in kept.items():
        for i in range(min(rows, len(k["images"]))):
            row = np.full((size, levels * (size + pad), 3), 255, np.uint8)
            for level in range(levels):
                if k["flat"] and level < levels - 1:
                    continue
                image = k["images"][i, -1 if k["flat"] else level]
                if not k["flat"] and level < levels - 1 and k["regions"].shape[-1]:
                    image = outline(image, k["regions"][i, level], grid)
                row[:, level * (size + pad):level * (size + pad) + size] = image
            blocks.append((name if i == 0 else "", row))
    height = len(blocks) * (size + pad) + 16
    out = Image.new("RGB", (label_w + levels * (size + pad), height), "white")
    draw = ImageDraw.Draw(out)
    for level in range(levels):
        draw.text((label_w + level * (size + pad) + 2, 2), f"level {level}", fill="black")
    for i, (name, row) in enumerate(blocks):
        y = 16 + i * (size + pad)
        out.paste(Image.fromarray(row), (label_w, y))
        if name:
            draw.text((4, y + 4), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


COLOURS = [(0, 0, 0), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def curve_figure(path: Path, curves: dict[str, list[tuple[float, float]]], title: str, log_y: bool = False) -> None:
    """A line chart (PIL: no plotting library in the project): one polyline per named series of (x, y)."""
    from PIL import Image, ImageDraw

    width, height, left, bottom, top, right = 560, 330, 60, 40, 24, 170
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    points = [p for series in curves.values() for p in series]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    fy = (lambda v: float(np.log10(v))) if log_y else float
    x0, x1, y0, y1 = 0.0, max(xs), min(fy(y) for y in ys), max(fy(y) for y in ys)
    y0, y1 = y0 - 0.05 * (y1 - y0 + 1e-9), y1 + 0.05 * (y1 - y0 + 1e-9)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (fy(y) - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        label = 10 ** yv if log_y else yv
        y = height - bottom - k / 4 * (height - top - bottom)
        draw.text((4, y - 6), f"{label:.3g}", fill="black")
        xv = x1 * k / 4
        x_label = f"{xv:,.0f}" if xv >= 100 else f"{xv:.3g}"   # steps: 1,024, not 1.02e+03
        draw.text((left + k / 4 * (width - left - right) - 8, height - bottom + 4), x_label, fill="black")
    draw.text((left, 4), title, fill="black")
    for i, (name, series) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [at(x, y) for x, y in sorted(series)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - right + 8, top + 14 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def redraw(result_json: Path, figure: Path, curves_figure: Path, rows: int) -> None:
    """Figures from a finished run's JSON (and its kept trajectories, when beside it)."""
    body = json.loads(result_json.read_text())
    arms = body["arms"]
    by_steps = all("steps" in c for arm in arms.values() for c in arm["curve"].values())
    x = "steps" if by_steps else "seconds"   # older runs: equal GPU seconds per arm
    curves = {name: [(c[x], c["fd_scenes"]) for c in arm["curve"].values() if "fd_scenes" in c]
              for name, arm in arms.items()}
    title = "FD-scenes against generator steps (mean over seeds)" if by_steps else \
        "FD-scenes against training seconds (equal GPU time per arm)"
    curve_figure(curves_figure, curves, title, log_y=True)
    kept_file = result_json.with_name("trajectory_proof_kept.npz")
    if kept_file.exists():
        kept = np.load(kept_file)
        present = {key.rsplit(".", 1)[0] for key in kept.files}
        names = [n for arm in arms for n in (arm, f"{arm} snapped") if n in present]   # each arm, then snapped
        proof_figure(figure, {name: {key: kept[f"{name}.{key}"] for key in ("images", "regions", "flat")}
                              for name in names}, body["setup"]["grid"], rows)
