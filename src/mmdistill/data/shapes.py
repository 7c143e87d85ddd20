"""`shapes`: a procedural image-caption set of coloured geometric shapes, drawn from the seed in seconds.

A scene holds 1-3 shapes (7 kinds, 8 colours, 2 sizes): one shape at a position, a pair in a left/right or
above/below relation, three in a row or column, or a counted group ("two green triangles above a blue ring").
Every kind, colour and size appears in many scenes, so only the combination and the layout identify an image.
Each image gets varied captions (templates, word order, synonyms). Test scenes are distinct and never reused by
validation or train; validation scenes are never reused by train. Defaults mirror Flickr30k scaled down.

Captions say left/right, so a horizontal flip would make them wrong: FLIP_SAFE is False.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmdistill.data import cfg_value, in_memory_split, requested_size, with_article
from mmdistill.errors import UserError
from mmdistill.utils import derive_seed

FLIP_SAFE = False
DEFAULT_SIZES = {"train": 4000, "validation": 500, "test": 1000}
DEFAULT_IMAGE_SIZE = 32

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (130, 55, 170),
    "orange": (240, 130, 25),
    "pink": (240, 125, 185),
    "cyan": (35, 190, 200),
}
RADII = {"small": 0.09, "big": 0.14}  # fraction of the image side
COLOUR_NAMES, SIZE_NAMES = list(COLOURS), list(RADII)


def _ring(u, v):
    d = u * u + v * v
    return (d <= 1) & (d >= 0.25)


# Masks in shape coordinates: (u, v) = (pixel - centre) / radius, v pointing down.
MASKS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.85,
    "triangle": lambda u, v: (v <= 0.75) & (abs(u) <= (v + 1) * 0.6),
    "cross": lambda u, v: ((abs(u) <= 0.33) & (abs(v) <= 1)) | ((abs(v) <= 0.33) & (abs(u) <= 1)),
    "ring": _ring,
    "bar": lambda u, v: (abs(u) <= 1) & (abs(v) <= 0.35),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.1,
}
KINDS = list(MASKS)
KIND_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut"),
    "bar": ("bar", "stripe"),
    "diamond": ("diamond",),
}
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}


@dataclass(frozen=True)
class Layout:
    centres: tuple[tuple[float, float], ...]  # (x, y) per shape, in [0, 1]
    sides: tuple[str, ...]  # where each shape is, in caption words


def _layouts() -> dict[str, Layout]:
    left, right, top, bottom, centre = (0.27, 0.5), (0.73, 0.5), (0.5, 0.27), (0.5, 0.73), (0.5, 0.5)
    layouts = {
        name: Layout((xy,), (name,))
        for name, xy in [("left", left), ("right", right), ("top", top), ("bottom", bottom), ("center", centre)]
    }
    layouts["pair-h"] = Layout((left, right), ("left", "right"))
    layouts["pair-v"] = Layout((top, bottom), ("top", "bottom"))
    layouts["row"] = Layout(((0.16, 0.5), centre, (0.84, 0.5)), ("left", "center", "right"))
    layouts["column"] = Layout(((0.5, 0.16), centre, (0.5, 0.84)), ("top", "center", "bottom"))
    # two identical shapes on one side, a third on the opposite side
    a, b = 0.27, 0.73
    layouts["two-left"] = Layout(((a, a), (a, b), right), ("left", "left", "right"))
    layouts["two-right"] = Layout(((b, a), (b, b), left), ("right", "right", "left"))
    layouts["two-top"] = Layout(((a, a), (b, a), bottom), ("top", "top", "bottom"))
    layouts["two-bottom"] = Layout(((a, b), (b, b), top), ("bottom", "bottom", "top"))
    return layouts


LAYOUTS = _layouts()
SCENE_KINDS = {  # scene kind -> (probability, layouts)
    "single": (0.15, ["left", "right", "top", "bottom", "center"]),
    "pair": (0.35, ["pair-h", "pair-v"]),
    "triple": (0.2, ["row", "column"]),
    "group": (0.1, ["pair-h", "pair-v", "row", "column"]),
    "two_and_one": (0.2, ["two-left", "two-right", "two-top", "two-bottom"]),
}
POSITION_JITTER = 0.02
RADIUS_JITTER = 0.06


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    kind: str  # scene kind (a key of SCENE_KINDS); "group" scenes repeat one shape
    layout: str
    shapes: tuple[Shape, ...]


def _random_shape(rng: np.random.Generator) -> Shape:
    return Shape(
        KINDS[rng.integers(len(KINDS))],
        COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
        SIZE_NAMES[rng.integers(len(SIZE_NAMES))],
    )


def _distinct_shapes(rng: np.random.Generator, count: int) -> list[Shape]:
    shapes: list[Shape] = []
    while len(shapes) < count:
        shape = _random_shape(rng)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(SCENE_KINDS)
    kind = names[rng.choice(len(names), p=[SCENE_KINDS[name][0] for name in names])]
    layouts = SCENE_KINDS[kind][1]
    layout = layouts[rng.integers(len(layouts))]
    slots = len(LAYOUTS[layout].centres)
    if kind == "group":
        shapes = [_random_shape(rng)] * slots
    elif kind == "two_and_one":
        pair, other = _distinct_shapes(rng, 2)
        shapes = [pair, pair, other]
    else:
        shapes = _distinct_shapes(rng, slots)
    return Scene(kind, layout, tuple(shapes))


def draw_scenes(rng: np.random.Generator, count: int, excluded: set[Scene], distinct: bool) -> list[Scene]:
    """`count` random scenes avoiding `excluded` (and each other when `distinct`)."""
    scenes: list[Scene] = []
    seen = set(excluded)
    for _ in range(100 * count):
        scene = random_scene(rng)
        if scene not in seen:
            scenes.append(scene)
            if distinct:
                seen.add(scene)
            if len(scenes) == count:
                return scenes
    raise UserError(f"shapes: cannot draw {count} distinct scenes; ask for fewer images")


# ---- captions ----------------------------------------------------------------------------------------------------


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


SIDE_WORDS = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_WORDS = {  # where the first shape is relative to the second
    ("left", "right"): ("to the left of", "left of"),
    ("right", "left"): ("to the right of", "right of"),
    ("top", "bottom"): ("above", "over"),
    ("bottom", "top"): ("below", "under"),
}


class Words:
    """Phrases for shapes and places, each drawing one of its synonyms from the caption generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.rng.integers(len(options))] if len(options) > 1 else options[0]

    def bare(self, shape: Shape, size: bool = True) -> str:
        """'small red circle' (no article)."""
        words = [self.pick(SIZE_WORDS[shape.size])] if size else []
        return " ".join(words + [shape.colour, self.pick(KIND_WORDS[shape.kind])])

    def a(self, shape: Shape, size: bool = True) -> str:
        return with_article(self.bare(shape, size))

    def many(self, shape: Shape, size: bool = True) -> str:
        """'small green triangles'."""
        words = [self.pick(SIZE_WORDS[shape.size])] if size else []
        return " ".join(words + [shape.colour, plural(self.pick(KIND_WORDS[shape.kind]))])

    def size(self, shape: Shape) -> str:
        return self.pick(SIZE_WORDS[shape.size])

    def side(self, side: str) -> str:
        return self.pick(SIDE_WORDS[side])

    def relation(self, first: str, second: str) -> str:
        return self.pick(RELATION_WORDS[first, second])


def _single(scene: Scene, w: Words) -> list[str]:
    (s,), (p,) = scene.shapes, LAYOUTS[scene.layout].sides
    return [
        f"{w.a(s)} {w.side(p)}",
        f"{w.bare(s, size=False)}, {w.size(s)}, {w.side(p)}",
        f"a picture of one {w.bare(s)} {w.side(p)}",
        f"{w.side(p)} there is {w.a(s)}",
        f"{w.a(s, size=False)} {w.side(p)}, it is {w.size(s)}",
        f"one {w.bare(s)} placed {w.side(p)} of the image",
        f"{w.size(s)} {w.pick(KIND_WORDS[s.kind])} coloured {s.colour} {w.side(p)}",
    ]


def _pair(scene: Scene, w: Words) -> list[str]:
    (s, t), (p, q) = scene.shapes, LAYOUTS[scene.layout].sides
    return [
        f"{w.a(s)} {w.relation(p, q)} {w.a(t)}",
        f"{w.a(t)} {w.relation(q, p)} {w.a(s)}",
        f"{w.bare(t)} {w.side(q)}, {w.bare(s)} {w.side(p)}",
        f"{w.side(p)} {w.a(s)}, {w.side(q)} {w.a(t)}",
        f"a picture with {w.a(s)} {w.relation(p, q)} {w.a(t)}",
        f"two shapes, {w.a(t)} {w.side(q)} and {w.a(s)} {w.side(p)}",
        f"{w.bare(s)} {w.side(p)} and {w.bare(t)} {w.side(q)}",
    ]


def _triple(scene: Scene, w: Words) -> list[str]:
    (s, t, u), (p, m, q) = scene.shapes, LAYOUTS[scene.layout].sides
    horizontal = scene.layout == "row"
    forward, backward = (
        ("from left to right", "from right to left") if horizontal else ("from top to bottom", "from bottom to top")
    )
    return [
        f"{w.a(s)}, {w.a(t)} and {w.a(u)} {forward}",
        f"{w.a(u)}, {w.a(t)} and {w.a(s)} {backward}",
        f"{w.a(t)} between {w.a(s)} {w.side(p)} and {w.a(u)} {w.side(q)}",
        f"three shapes in a {'row' if horizontal else 'column'}, {w.bare(s)}, {w.bare(t)}, {w.bare(u)}",
        f"{w.a(s)} {w.relation(p, q)} {w.a(t)}, which is {w.relation(p, q)} {w.a(u)}",
        f"{w.bare(s)} {w.side(p)}, {w.bare(t)} {w.side(m)}, {w.bare(u)} {w.side(q)}",
        f"{w.side(p)} {w.a(s)}, {w.side(m)} {w.a(t)}, {w.side(q)} {w.a(u)}",
    ]


def _group(scene: Scene, w: Words) -> list[str]:
    s, n = scene.shapes[0], ("two", "three")[len(scene.shapes) - 2]
    horizontal = scene.layout in ("pair-h", "row")
    arranged = ("side by side", "in a row") if horizontal else ("one above the other", "in a column")
    return [
        f"{n} {w.many(s)}",
        f"{n} {w.many(s)} {w.pick(arranged)}",
        f"a {'row' if horizontal else 'column'} of {n} {w.many(s)}",
        f"{n} identical {w.many(s, size=False)}, all {w.size(s)}",
        f"a picture with {n} {w.size(s)} {plural(w.pick(KIND_WORDS[s.kind]))} coloured {s.colour}",
        f"{n} {w.many(s)} arranged {'horizontally' if horizontal else 'vertically'}",
        f"{w.many(s)}, {n} of them, {w.pick(arranged)}",
    ]


def _two_and_one(scene: Scene, w: Words) -> list[str]:
    (s, _, t), (p, _, q) = scene.shapes, LAYOUTS[scene.layout].sides
    return [
        f"two {w.many(s)} {w.relation(p, q)} {w.a(t)}",
        f"{w.a(t)} {w.relation(q, p)} two {w.many(s)}",
        f"two {w.many(s)} {w.side(p)} and {w.a(t)} {w.side(q)}",
        f"{w.bare(t)} {w.side(q)}, a pair of {w.many(s)} {w.side(p)}",
        f"a pair of {w.many(s)} {w.relation(p, q)} {w.a(t)}",
        f"{w.side(q)} {w.a(t)}, {w.side(p)} two {w.many(s)}",
        f"two {w.many(s)} and one {w.bare(t)}, the pair is {w.side(p)}",
    ]


TEMPLATES = {"single": _single, "pair": _pair, "triple": _triple, "group": _group, "two_and_one": _two_and_one}
TEMPLATES_PER_SCENE = 7


def scene_captions(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions of the scene from distinct templates, in random order, with random synonyms."""
    captions = TEMPLATES[scene.kind](scene, Words(rng))
    return [captions[i] for i in rng.choice(len(captions), size=count, replace=False)]


# ---- rendering ---------------------------------------------------------------------------------------------------


def render_scenes(scenes: list[Scene], image_size: int, rng: np.random.Generator, chunk: int = 512) -> torch.Tensor:
    """uint8 [N,3,S,S]: each shape's mask is drawn at twice the size and 2x2 average-pooled into a coverage map
    (antialiasing), then blended over a grey background. Shapes do not overlap by layout, so blending the
    pooled masks equals pooling the full-size drawing.

    Positions, radii, colours and background get a little random jitter.
    """
    shape_image, shape_slot, centres, radii, kinds, colours = [], [], [], [], [], []
    for i, scene in enumerate(scenes):
        for slot, (shape, centre) in enumerate(zip(scene.shapes, LAYOUTS[scene.layout].centres)):
            shape_image.append(i)
            shape_slot.append(slot)
            centres.append(centre)
            radii.append(RADII[shape.size])
            kinds.append(KINDS.index(shape.kind))
            colours.append(COLOURS[shape.colour])
    count = len(shape_image)
    shape_image, shape_slot, kinds = np.array(shape_image), np.array(shape_slot), np.array(kinds)
    centres = (np.array(centres) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, (count, 2))).astype(np.float32)
    radii = (np.array(radii) * rng.uniform(1 - RADIUS_JITTER, 1 + RADIUS_JITTER, count)).astype(np.float32)
    colours = (np.array(colours) + rng.uniform(-12, 12, (count, 3))).astype(np.float32)
    grey = rng.uniform(70, 190, (len(scenes), 1)) + rng.uniform(-12, 12, (len(scenes), 3))
    images = np.broadcast_to(grey[:, :, None, None], (len(scenes), 3, image_size, image_size)).astype(np.float32)

    resolution = 2 * image_size
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    for start in range(0, len(scenes), chunk):
        for slot in range(3):  # one shape per image per pass, so the indexed writes below never collide
            selected = np.flatnonzero((shape_image >= start) & (shape_image < start + chunk) & (shape_slot == slot))
            if len(selected) == 0:
                continue
            r = radii[selected, None, None]
            u = (grid[None, None, :] - centres[selected, 0, None, None]) / r
            v = (grid[None, :, None] - centres[selected, 1, None, None]) / r
            mask = np.zeros((len(selected), resolution, resolution), dtype=bool)
            for k, kind in enumerate(KINDS):
                of_kind = kinds[selected] == k
                if of_kind.any():
                    mask[of_kind] = MASKS[kind](u[of_kind], v[of_kind])
            coverage = mask.reshape(len(selected), 1, image_size, 2, image_size, 2).mean((3, 5), dtype=np.float32)
            rows = shape_image[selected]
            images[rows] = images[rows] * (1 - coverage) + colours[selected, :, None, None] * coverage
    return torch.from_numpy(np.rint(images).clip(0, 255).astype(np.uint8))


# ---- source ------------------------------------------------------------------------------------------------------


def build(data_cfg) -> dict:
    """Draw test, then validation, then train scenes (each avoiding the earlier ones), caption and render them."""
    seed = int(cfg_value(data_cfg, "seed", 0))
    image_size = int(cfg_value(data_cfg, "image_size", DEFAULT_IMAGE_SIZE))
    per_image = int(cfg_value(data_cfg, "captions_per_image", 5))
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    if not 1 <= per_image <= TEMPLATES_PER_SCENE:
        raise UserError(f"data.captions_per_image must be in 1..{TEMPLATES_PER_SCENE} for shapes, got {per_image}")
    if image_size < 8:
        raise UserError(f"data.image_size must be at least 8 for shapes, got {image_size}")
    splits, used = {}, set()
    for name in ("test", "validation", "train"):
        count = requested_size(data_cfg, name) or DEFAULT_SIZES[name]
        rng = np.random.default_rng(derive_seed(seed, "shapes", name))
        scenes = draw_scenes(rng, count, used, distinct=name != "train")
        used.update(scenes)
        captions = [scene_captions(scene, rng, per_image) for scene in scenes]
        splits[name] = in_memory_split(name, captions, render_scenes(scenes, image_size, rng), max_words)
    return {name: splits[name] for name in ("train", "validation", "test")}
