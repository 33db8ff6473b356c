"""Procedural objects for the built-in scenes, painted part by part into aligned label layers.

Every shape goes through the same ImageDraw call on four layers: the RGB image, the
object layer, the part layer and the subpart layer. The masks therefore match the
pixels exactly and painter's order (later shapes overwrite earlier ones) applies to
all four alike. A subpart id is only ever painted together with the part that owns
it, so subparts nest in parts and parts in the object by construction.

Drawers work in frame units: (u, v) in [0, 1]^2 spans the object's box, so geometry
scales with the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
Point = tuple[float, float]
MAX_LABEL = 255  # label layers are 8-bit


def jitter(rng: np.random.Generator, base: Colour, spread: int = 16) -> Colour:
    """A colour near `base`: parts keep their identity but never repeat exactly."""
    offsets = rng.integers(-spread, spread + 1, size=3)
    return tuple(int(np.clip(channel + offset, 0, 255)) for channel, offset in zip(base, offsets))


def pick_colour(rng: np.random.Generator, options: Sequence[Colour], spread: int = 16) -> Colour:
    return jitter(rng, options[int(rng.integers(len(options)))], spread)


def oval_points(centre: Point, along: float, across: float, angle: float, count: int = 16) -> list[Point]:
    """Polygon of an ellipse with semi-axes `along`/`across` (pixels), rotated by `angle` radians."""
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for step in range(count):
        theta = 2.0 * math.pi * step / count
        x, y = along * math.cos(theta), across * math.sin(theta)
        points.append((centre[0] + x * cos_a - y * sin_a, centre[1] + x * sin_a + y * cos_a))
    return points


def disc(centre: Point, radius: float) -> tuple[float, float, float, float]:
    """Bounding box of a circle given in pixels."""
    return (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)


class LayeredCanvas:
    """An RGB image plus object/part/subpart label layers painted in lockstep."""

    def __init__(self, background: np.ndarray) -> None:
        height, width = background.shape[:2]
        self.image = Image.fromarray(np.ascontiguousarray(background, dtype=np.uint8))
        self.labels = [Image.new("L", (width, height), 0) for _ in range(3)]
        self._draws = [ImageDraw.Draw(self.image), *(ImageDraw.Draw(layer) for layer in self.labels)]
        self._last_part = 0
        self._last_subpart = 0

    def new_part(self) -> Pen:
        """A pen for a new part; what it draws directly is the part's base subpart."""
        self._last_part += 1
        return Pen(self, self._last_part, self.allocate_subpart())

    def allocate_subpart(self) -> int:
        self._last_subpart += 1
        if self._last_subpart > MAX_LABEL:
            raise RuntimeError("scene has more subparts than an 8-bit label layer holds")
        return self._last_subpart

    def paint(self, shape: str, coords: object, colour: Colour, part_id: int, subpart_id: int,
              **options: object) -> None:
        for draw, value in zip(self._draws, (colour, 1, part_id, subpart_id)):
            getattr(draw, shape)(coords, fill=value, **options)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], masks uint8 [3, H, W]) with raw, possibly gappy ids."""
        image = np.array(self.image, dtype=np.uint8)
        masks = np.stack([np.array(layer, dtype=np.uint8) for layer in self.labels])
        return image, masks


@dataclass(frozen=True)
class Pen:
    """Draws shapes into one (part, subpart) pair of a canvas."""

    canvas: LayeredCanvas
    part_id: int
    subpart_id: int

    def new_subpart(self) -> Pen:
        return Pen(self.canvas, self.part_id, self.canvas.allocate_subpart())

    def _paint(self, shape: str, coords: object, colour: Colour, **options: object) -> None:
        self.canvas.paint(shape, coords, colour, self.part_id, self.subpart_id, **options)

    def polygon(self, points: Sequence[Point], colour: Colour) -> None:
        self._paint("polygon", list(points), colour)

    def rectangle(self, box: tuple[float, float, float, float], colour: Colour) -> None:
        self._paint("rectangle", box, colour)

    def rounded_rectangle(self, box: tuple[float, float, float, float], radius: float, colour: Colour) -> None:
        self._paint("rounded_rectangle", box, colour, radius=max(0, int(radius)))

    def ellipse(self, box: tuple[float, float, float, float], colour: Colour) -> None:
        self._paint("ellipse", box, colour)

    def line(self, points: Sequence[Point], colour: Colour, width: float) -> None:
        self._paint("line", list(points), colour, width=max(1, round(width)), joint="curve")


@dataclass(frozen=True)
class Frame:
    """The pixel box of one object; maps frame units (u, v) to pixels, optionally mirrored."""

    left: float
    top: float
    width: float
    height: float
    mirrored: bool = False

    def point(self, u: float, v: float) -> Point:
        if self.mirrored:
            u = 1.0 - u
        return (self.left + u * self.width, self.top + v * self.height)

    def points(self, uvs: Iterable[tuple[float, float]]) -> list[Point]:
        return [self.point(u, v) for u, v in uvs]

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.point(u0, v0), self.point(u1, v1)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def circle(self, u: float, v: float, radius: float) -> tuple[float, float, float, float]:
        """Bounding box of a true circle; `radius` is in units of the frame height."""
        x, y = self.point(u, v)
        r = radius * self.height
        return (x - r, y - r, x + r, y + r)


@dataclass(frozen=True)
class Taper:
    """A vertical trapezoid in frame units (a triangle when one end has zero width)."""

    top: float
    bottom: float
    top_left: float
    top_right: float
    bottom_left: float
    bottom_right: float

    def edges_at(self, v: float) -> tuple[float, float]:
        t = (v - self.top) / (self.bottom - self.top)
        return (self.top_left + t * (self.bottom_left - self.top_left),
                self.top_right + t * (self.bottom_right - self.top_right))

    def band(self, v0: float, v1: float) -> list[tuple[float, float]]:
        """The slice of the taper between heights v0 and v1 (stripes, panels)."""
        (l0, r0), (l1, r1) = self.edges_at(v0), self.edges_at(v1)
        return [(l0, v0), (r0, v0), (r1, v1), (l1, v1)]

    def outline(self) -> list[tuple[float, float]]:
        return self.band(self.top, self.bottom)


Drawer = Callable[[LayeredCanvas, Frame, np.random.Generator], None]


@dataclass(frozen=True)
class ObjectSpec:
    """How to draw one class and how big its box is when it is the main object."""

    draw: Drawer
    aspect: tuple[float, float]  # box width / height
    height: tuple[float, float]  # main-object box height as a fraction of the image
    habitat: str  # "land", "water" or "any": which ground it may stand on


# Palettes: each part and subpart gets its own family of colours, jittered per scene.
WALLS = [(228, 206, 160), (196, 120, 92), (236, 234, 222), (168, 190, 212)]
ROOFS = [(150, 48, 40), (72, 72, 92), (112, 70, 42)]
WOOD = [(120, 72, 40), (60, 92, 60), (40, 60, 110)]
GLASS = [(150, 200, 230), (120, 170, 210)]
BARK = [(104, 70, 44), (86, 62, 50)]
LEAVES = [(60, 140, 50), (90, 150, 40), (40, 110, 60)]
CAR_PAINT = [(200, 30, 40), (30, 80, 190), (240, 200, 40), (30, 150, 90), (240, 240, 240)]
HULLS = [(240, 240, 235), (150, 40, 40), (40, 60, 120), (110, 80, 50)]
SAILS = [(250, 248, 235), (235, 225, 200)]
PETALS = [(230, 60, 80), (250, 210, 40), (170, 80, 200), (250, 140, 40), (245, 245, 245)]
ACCENTS = [(220, 40, 40), (30, 110, 200), (250, 160, 20)]


def draw_house(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    eave = rng.uniform(0.38, 0.46)
    walls = canvas.new_part()
    walls.rectangle(frame.box(0.06, eave, 0.94, 1.0), pick_colour(rng, WALLS))
    walls.new_subpart().rectangle(frame.box(0.06, 0.93, 0.94, 1.0), jitter(rng, (104, 98, 92)))

    roof = canvas.new_part()
    chimney_u = rng.uniform(0.62, 0.72)  # drawn first so the roof hides its foot
    chimney = frame.box(chimney_u, 0.05, chimney_u + 0.1, eave - 0.1)
    roof.new_subpart().rectangle(chimney, jitter(rng, (150, 80, 64)))
    ridge_half = rng.uniform(0.0, 0.22)  # 0 gives a gable, more gives a hipped roof
    shape = Taper(0.02, eave + 0.03, 0.5 - ridge_half, 0.5 + ridge_half, -0.02, 1.02)
    roof.polygon(frame.points(shape.outline()), pick_colour(rng, ROOFS))
    stripes, stripe_colour = roof.new_subpart(), pick_colour(rng, [(210, 170, 120), (40, 40, 50)])
    count = int(rng.integers(2, 4))
    for row in range(count):
        v0 = shape.top + (row + 0.6) * (shape.bottom - shape.top) / (count + 0.5)
        stripes.polygon(frame.points(shape.band(v0, v0 + 0.045)), stripe_colour)

    door = canvas.new_part()
    door_u, door_w = rng.uniform(0.4, 0.46), rng.uniform(0.16, 0.2)
    door.rectangle(frame.box(door_u, 0.64, door_u + door_w, 1.0), pick_colour(rng, WOOD))
    panels, panel_colour = door.new_subpart(), pick_colour(rng, [(200, 170, 110), (170, 200, 170)])
    for v0, v1 in ((0.68, 0.79), (0.84, 0.96)):
        panels.rectangle(frame.box(door_u + 0.035, v0, door_u + door_w - 0.035, v1), panel_colour)
    door.new_subpart().ellipse(frame.circle(door_u + door_w - 0.03, 0.815, 0.022), jitter(rng, (230, 190, 50)))

    windows = canvas.new_part()
    panes = windows.new_subpart()
    frame_colour, glass = pick_colour(rng, [(250, 250, 245), (60, 60, 70)]), pick_colour(rng, GLASS)
    top = eave + rng.uniform(0.09, 0.13)
    for left in (0.12, door_u + door_w + 0.06):
        right = min(left + 0.2, 0.9)
        windows.rectangle(frame.box(left, top, right, top + 0.22), frame_colour)
        middle_u, middle_v = (left + right) / 2, top + 0.11
        for u0, u1 in ((left + 0.025, middle_u - 0.012), (middle_u + 0.012, right - 0.025)):
            for v0, v1 in ((top + 0.025, middle_v - 0.012), (middle_v + 0.012, top + 0.195)):
                panes.rectangle(frame.box(u0, v0, u1, v1), glass)


def draw_tree(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    trunk = canvas.new_part()
    top_half, bottom_half = rng.uniform(0.05, 0.07), rng.uniform(0.09, 0.12)
    shape = Taper(0.4, 1.0, 0.5 - top_half, 0.5 + top_half, 0.5 - bottom_half, 0.5 + bottom_half)
    trunk.polygon(frame.points(shape.outline()), pick_colour(rng, BARK))
    trunk.new_subpart().ellipse(frame.box(0.465, 0.74, 0.535, 0.84), jitter(rng, (50, 32, 24)))

    crown = canvas.new_part()
    if rng.random() < 0.65:  # round, leafy crown with highlights and fruit
        crown_colour = pick_colour(rng, LEAVES)
        crown.ellipse(frame.box(0.04, 0.02, 0.96, 0.64), crown_colour)
        for _ in range(3):
            u, v = rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.5)
            crown.ellipse(frame.box(u - 0.22, v - 0.16, u + 0.22, v + 0.16), crown_colour)
        highlight = crown.new_subpart()
        for _ in range(int(rng.integers(2, 4))):
            u, v = rng.uniform(0.25, 0.6), rng.uniform(0.12, 0.35)
            highlight.ellipse(frame.box(u - 0.11, v - 0.07, u + 0.11, v + 0.07), jitter(rng, (140, 200, 90)))
        fruit = crown.new_subpart()
        fruit_colour = pick_colour(rng, [(220, 40, 40), (250, 150, 30), (240, 200, 220)])
        for _ in range(int(rng.integers(4, 8))):
            angle, reach = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0.05, 0.6))
            u, v = 0.5 + 0.4 * reach * math.cos(angle), 0.33 + 0.26 * reach * math.sin(angle)
            fruit.ellipse(frame.circle(u, v, 0.03), fruit_colour)
    else:  # conifer: stacked tiers in two shades, with cones
        light, dark = pick_colour(rng, LEAVES), jitter(rng, (30, 80, 45))
        shade = crown.new_subpart()
        tiers = [Taper(0.02 + 0.19 * k, 0.4 + 0.19 * k, 0.5, 0.5, 0.3 - 0.1 * k, 0.7 + 0.1 * k) for k in range(3)]
        for k, tier in enumerate(reversed(tiers)):  # bottom tier first, so upper tiers overlap it
            pen, colour = (crown, light) if k % 2 == 0 else (shade, dark)
            pen.polygon(frame.points(tier.outline()), colour)
        cones, cone_colour = crown.new_subpart(), jitter(rng, (130, 80, 40))
        for tier in tiers[1:]:
            for side in (0.25, 0.7):
                u = tier.bottom_left + side * (tier.bottom_right - tier.bottom_left)
                cones.ellipse(frame.box(u - 0.03, tier.bottom - 0.06, u + 0.03, tier.bottom + 0.01), cone_colour)


def draw_car(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    paint = pick_colour(rng, CAR_PAINT)
    cabin = canvas.new_part()
    shape = Taper(0.1, 0.46, rng.uniform(0.26, 0.34), rng.uniform(0.62, 0.7), 0.16, 0.86)
    cabin.polygon(frame.points(shape.outline()), tuple(int(0.7 * c) for c in paint))
    glass, glass_colour = cabin.new_subpart(), pick_colour(rng, GLASS)
    inner = Taper(shape.top + 0.06, shape.bottom - 0.02, shape.top_left + 0.04, shape.top_right - 0.04,
                  shape.bottom_left + 0.05, shape.bottom_right - 0.05)
    pillar = rng.uniform(0.46, 0.54)
    (top_left, top_right), (bottom_left, bottom_right) = inner.edges_at(inner.top), inner.edges_at(inner.bottom)
    rear, front = pillar - 0.02, pillar + 0.02
    glass.polygon(frame.points([(top_left, inner.top), (rear, inner.top), (rear, inner.bottom),
                                (bottom_left, inner.bottom)]), glass_colour)
    glass.polygon(frame.points([(front, inner.top), (top_right, inner.top), (bottom_right, inner.bottom),
                                (front, inner.bottom)]), glass_colour)

    body = canvas.new_part()
    body.rounded_rectangle(frame.box(0.0, 0.42, 1.0, 0.84), 0.12 * frame.height, paint)
    body.new_subpart().ellipse(frame.box(0.93, 0.5, 1.0, 0.61), jitter(rng, (250, 240, 170)))
    body.new_subpart().rectangle(frame.box(0.0, 0.5, 0.035, 0.6), jitter(rng, (200, 20, 20)))
    body.new_subpart().rectangle(frame.box(0.02, 0.74, 0.98, 0.8), jitter(rng, (70, 70, 75)))
    if rng.random() < 0.6:
        body.new_subpart().rectangle(frame.box(0.08, 0.58, 0.92, 0.63), pick_colour(rng, ACCENTS))

    wheels = canvas.new_part()
    hubs = wheels.new_subpart()
    hub_colour, tyre_colour = jitter(rng, (180, 180, 190)), jitter(rng, (30, 30, 32), 8)
    radius = rng.uniform(0.15, 0.18)
    for u in (0.22, 0.78):
        wheels.ellipse(frame.circle(u, 0.83, radius), tyre_colour)
        hubs.ellipse(frame.circle(u, 0.83, 0.5 * radius), hub_colour)


def draw_boat(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    mast = canvas.new_part()
    mast.rectangle(frame.box(0.475, 0.0, 0.525, 0.7), jitter(rng, (90, 60, 40)))
    flag = frame.points([(0.525, 0.0), (0.68, 0.035), (0.525, 0.07)])
    mast.new_subpart().polygon(flag, pick_colour(rng, ACCENTS))

    sail = canvas.new_part()
    main = Taper(0.1, 0.64, 0.54, 0.54, 0.54, rng.uniform(0.9, 0.97))
    sail.polygon(frame.points(main.outline()), pick_colour(rng, SAILS))
    panels, panel_colour = sail.new_subpart(), pick_colour(rng, ACCENTS)
    for v0 in (0.3, 0.48):
        panels.polygon(frame.points(main.band(v0, v0 + 0.07)), panel_colour)
    jib = Taper(0.16, 0.64, 0.46, 0.46, rng.uniform(0.06, 0.14), 0.46)
    jib_colour = pick_colour(rng, [(200, 220, 240), (240, 220, 160)])
    sail.new_subpart().polygon(frame.points(jib.outline()), jib_colour)

    hull = canvas.new_part()
    shape = Taper(0.66, 0.92, 0.0, 1.0, 0.14, 0.86)
    hull.polygon(frame.points(shape.outline()), pick_colour(rng, HULLS))
    band_colour = pick_colour(rng, [(250, 200, 40), (40, 160, 200)])
    hull.new_subpart().polygon(frame.points(shape.band(0.7, 0.75)), band_colour)
    portholes = hull.new_subpart()
    for u in (0.3, 0.45, 0.6, 0.75):
        portholes.ellipse(frame.circle(u, 0.83, 0.03), jitter(rng, (60, 70, 90)))


def draw_flower(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    head_v = 0.3
    stem = canvas.new_part()
    bend = rng.uniform(-0.06, 0.06)
    stem_points = frame.points([(0.5, 1.0), (0.5 + bend, 0.7), (0.5, head_v)])
    stem.line(stem_points, jitter(rng, (50, 130, 50)), 0.07 * frame.width)

    leaves = canvas.new_part()
    veins = leaves.new_subpart()
    vein_colour, leaf_colour = jitter(rng, (170, 210, 120)), pick_colour(rng, LEAVES)
    length = 0.3 * frame.width
    for angle, v in ((-math.pi + 0.55, 0.78), (-0.55, 0.64)):
        base = frame.point(0.5, v)
        tip = (base[0] + length * math.cos(angle), base[1] + length * math.sin(angle))
        middle = ((base[0] + tip[0]) / 2, (base[1] + tip[1]) / 2)
        leaves.polygon(oval_points(middle, length / 2, length / 5, angle), leaf_colour)
        veins.line([base, tip], vein_colour, 0.02 * frame.width)

    petals = canvas.new_part()
    centre, radius = frame.point(0.5, head_v), rng.uniform(0.46, 0.52) * frame.width
    count, phase = int(rng.integers(5, 10)), rng.uniform(0, 2 * math.pi)
    petal_colour = pick_colour(rng, PETALS)
    across = 0.62 * radius * math.sin(math.pi / count)
    tips = petals.new_subpart() if rng.random() < 0.8 else None
    tip_colour = pick_colour(rng, [(120, 20, 60), (250, 250, 200), (60, 40, 160)])
    for k in range(count):
        angle = phase + 2 * math.pi * k / count
        direction = (math.cos(angle), math.sin(angle))
        middle = (centre[0] + 0.55 * radius * direction[0], centre[1] + 0.55 * radius * direction[1])
        petals.polygon(oval_points(middle, 0.45 * radius, across, angle), petal_colour)
        if tips is not None:
            spot = (centre[0] + 0.78 * radius * direction[0], centre[1] + 0.78 * radius * direction[1])
            tips.polygon(oval_points(spot, 0.12 * radius, 0.5 * across, angle, count=10), tip_colour)

    middle_part = canvas.new_part()
    middle_part.ellipse(disc(centre, 0.28 * radius), pick_colour(rng, [(250, 200, 40), (120, 70, 30)]))
    seeds, seed_colour = middle_part.new_subpart(), jitter(rng, (70, 40, 20))
    for k in range(7):
        angle = 2 * math.pi * k / 7
        seed_centre = (centre[0] + 0.15 * radius * math.cos(angle), centre[1] + 0.15 * radius * math.sin(angle))
        seeds.ellipse(disc(seed_centre, 0.05 * radius), seed_colour)


def draw_lighthouse(canvas: LayeredCanvas, frame: Frame, rng: np.random.Generator) -> None:
    base = canvas.new_part()
    base.polygon(frame.points([(0.0, 1.0), (1.0, 1.0), (0.9, 0.87), (0.1, 0.87)]), jitter(rng, (110, 105, 100)))
    stones = base.new_subpart()
    for u in (0.2, 0.45, 0.7):
        stones.ellipse(frame.box(u, 0.9, u + 0.13, 0.97), jitter(rng, (75, 70, 68)))

    tower = canvas.new_part()
    shape = Taper(0.3, 0.88, 0.3, 0.7, rng.uniform(0.16, 0.22), rng.uniform(0.78, 0.84))
    tower.polygon(frame.points(shape.outline()), jitter(rng, (240, 238, 230)))
    stripes, stripe_colour = tower.new_subpart(), pick_colour(rng, [(210, 40, 40), (30, 60, 140), (30, 30, 30)])
    for v0 in (0.38, 0.56, 0.74):
        stripes.polygon(frame.points(shape.band(v0, v0 + 0.08)), stripe_colour)
    tower.new_subpart().rectangle(frame.box(0.43, 0.76, 0.57, 0.88), pick_colour(rng, WOOD))

    lamp = canvas.new_part()
    lamp.rectangle(frame.box(0.3, 0.15, 0.7, 0.29), jitter(rng, (40, 40, 45)))
    lamp.new_subpart().rectangle(frame.box(0.36, 0.17, 0.64, 0.27), jitter(rng, (255, 230, 120)))
    lamp.new_subpart().rectangle(frame.box(0.18, 0.27, 0.82, 0.32), jitter(rng, (60, 60, 70)))

    roof = canvas.new_part()
    roof.polygon(frame.points([(0.24, 0.16), (0.76, 0.16), (0.5, 0.04)]), pick_colour(rng, ROOFS))
    roof.new_subpart().ellipse(frame.circle(0.5, 0.04, 0.02), jitter(rng, (230, 200, 60)))


OBJECT_SPECS: dict[str, ObjectSpec] = {
    "house": ObjectSpec(draw_house, aspect=(1.0, 1.25), height=(0.55, 0.72), habitat="land"),
    "tree": ObjectSpec(draw_tree, aspect=(0.75, 0.9), height=(0.76, 0.9), habitat="land"),
    "car": ObjectSpec(draw_car, aspect=(1.7, 1.9), height=(0.44, 0.52), habitat="land"),
    "boat": ObjectSpec(draw_boat, aspect=(0.9, 1.1), height=(0.68, 0.84), habitat="water"),
    "flower": ObjectSpec(draw_flower, aspect=(0.7, 0.8), height=(0.8, 0.92), habitat="land"),
    "lighthouse": ObjectSpec(draw_lighthouse, aspect=(0.6, 0.7), height=(0.8, 0.92), habitat="any"),
}
