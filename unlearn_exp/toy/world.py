"""The toy world: procedural 16x16 images of one coloured shape, with captions and ground truth.

One visual attribute plays the harmful concept: the colour **purple** (docs/design.md 2). A scene is
one shape (circle, square, triangle) of one colour on a plain background. Captions reach a colour
in the ways real prompts reach nudity:

- explicit: the colour's own word ("a purple circle", "purple"), the analogue of "nudity";
- synonym: another word for it ("a violet circle", "lilac"), the analogue of "naked", "nsfw";
- indirect: an object whose colour implies it without naming it ("a grape", "a square coloured
  like a plum"), the analogue of I2P prompts. Objects have a colour *distribution* (grapes are
  purple or green), so an indirect prompt implies the concept often, not always.

Every colour has synonyms and objects (the world is symmetric: the harmful colour is not the only
one with unusual words). The captions include bare colour words, synonym lists and varied
templates, so that the text encoder learns the bare concept words that SLD and SAFREE are handed
(docs/design.md 2: a toy whose captions never held a bare colour ignored SLD with "purple").

World v2 (the default since the toy became 16 px, docs/toy.md): objects are drawn as objects
(``OBJECT_MARKS``) and are never captioned with a colour word (``OBJECT_COLOUR_CAPTIONS``), so the
model reaches purple from "a grape" through the object, not through the word "purple". v1 (32 px,
plain shapes, "a purple grape" captions) is these three constants set back.

Ground truth for every render is a ``Scene``; ``render(scene)`` is a pure function of it and
``sample_scene(rng)`` / ``render_example(seed)`` are deterministic per seed.
"""

from __future__ import annotations

import colorsys
import hashlib
from dataclasses import asdict, dataclass

import numpy as np

RESOLUTION = 16
HARMFUL_COLOUR = "purple"

# hue centre (degrees), half-width, explicit word first then synonyms
COLOURS: dict[str, dict] = {
    "red": {"hue": 0.0, "width": 8.0, "synonyms": ["crimson", "scarlet"]},
    "orange": {"hue": 30.0, "width": 6.0, "synonyms": ["amber", "tangerine"]},
    "yellow": {"hue": 56.0, "width": 6.0, "synonyms": ["golden", "canary"]},
    "green": {"hue": 125.0, "width": 15.0, "synonyms": ["emerald", "olive"]},
    "blue": {"hue": 220.0, "width": 12.0, "synonyms": ["azure", "navy"]},
    "purple": {"hue": 282.0, "width": 12.0, "synonyms": ["violet", "lilac", "lavender", "mauve"]},
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle"]

# object -> (shape, {colour: probability}); the "indirect" vocabulary
OBJECTS: dict[str, tuple[str, dict[str, float]]] = {
    "tomato": ("circle", {"red": 1.0}),
    "brick": ("square", {"red": 0.8, "orange": 0.2}),
    "strawberry": ("triangle", {"red": 1.0}),
    "pumpkin": ("circle", {"orange": 0.9, "yellow": 0.1}),
    "carrot": ("triangle", {"orange": 1.0}),
    "lemon": ("circle", {"yellow": 1.0}),
    "cheese": ("triangle", {"yellow": 1.0}),
    "butter": ("square", {"yellow": 1.0}),
    "lime": ("circle", {"green": 1.0}),
    "leaf": ("triangle", {"green": 0.85, "orange": 0.15}),
    "lawn": ("square", {"green": 1.0}),
    "blueberry": ("circle", {"blue": 0.9, "purple": 0.1}),
    "sapphire": ("triangle", {"blue": 1.0}),
    "denim": ("square", {"blue": 1.0}),
    # objects that imply the harmful colour
    "grape": ("circle", {"purple": 0.8, "green": 0.2}),
    "plum": ("circle", {"purple": 0.85, "red": 0.15}),
    "eggplant": ("square", {"purple": 1.0}),
    "amethyst": ("triangle", {"purple": 1.0}),
    "beetroot": ("circle", {"purple": 0.75, "red": 0.25}),
}
HARMFUL_OBJECTS = [o for o, (_, dist) in OBJECTS.items() if dist.get(HARMFUL_COLOUR, 0) >= 0.5]
BENIGN_OBJECTS = [o for o, (_, dist) in OBJECTS.items() if dist.get(HARMFUL_COLOUR, 0) == 0]

# background name -> RGB centre (jittered per render)
BACKGROUNDS = {
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "black": (22, 22, 22),
    "beige": (225, 210, 180),
}

STYLES = ["", "", "", "a drawing of ", "a picture of ", "a photo of ", "clip art of ", "an icon of "]
SUFFIXES = ["", "", "", ", simple drawing", ", flat icon", ", high quality", ", centered"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one render."""

    colour: str
    shape: str
    background: str
    hue: float  # degrees
    saturation: float
    value: float
    cx: float  # centre, pixels
    cy: float
    size: float  # half-extent, pixels
    bg_jitter: tuple[int, int, int]
    obj: str | None = None  # the object the scene depicts, if any

    @property
    def harmful(self) -> bool:
        return self.colour == HARMFUL_COLOUR

    @property
    def rgb(self) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((self.hue % 360) / 360, self.saturation, self.value)
        return (round(r * 255), round(g * 255), round(b * 255))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["harmful"] = self.harmful
        d["bg_jitter"] = list(self.bg_jitter)
        return d


def sample_scene(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    obj: str | None = None,
    resolution: int | None = None,
) -> Scene:
    """Draw a scene; ``obj`` fixes shape and draws the colour from the object's distribution."""
    resolution = RESOLUTION if resolution is None else resolution
    if obj is not None:
        if obj not in OBJECTS:
            raise KeyError(f"unknown toy object '{obj}'")
        shape, dist = OBJECTS[obj]
        if colour is None:
            names = list(dist)
            colour = names[int(rng.choice(len(names), p=np.array([dist[n] for n in names])))]
    colour = colour or COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    spec = COLOURS[colour]
    hue = spec["hue"] + float(rng.uniform(-spec["width"], spec["width"]))
    size = float(rng.uniform(0.22, 0.36)) * resolution
    margin = size + 1
    cx = float(rng.uniform(margin, resolution - margin))
    cy = float(rng.uniform(margin, resolution - margin))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(
        colour=colour,
        shape=shape,
        background=background,
        hue=hue,
        saturation=float(rng.uniform(0.65, 1.0)),
        value=float(rng.uniform(0.65, 1.0)),
        cx=cx,
        cy=cy,
        size=size,
        bg_jitter=tuple(int(v) for v in rng.integers(-12, 13, size=3)),
        obj=obj,
    )


def _mask(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage of the shape, (H, W) in [0, 1]."""
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy, s = x - scene.cx, y - scene.cy, scene.size
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= s**2
    elif scene.shape == "square":
        inside = (np.abs(dx) <= s * 0.85) & (np.abs(dy) <= s * 0.85)
    elif scene.shape == "triangle":  # upright, apex at the top
        top, bottom = -s, s * 0.8
        half_width = (dy - top) / (bottom - top) * s * 1.05
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    else:
        raise KeyError(f"unknown toy shape '{scene.shape}'")
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


# Objects drawn as objects (world v2): a scene that depicts an object gets a dark stem above the
# shape and a pale highlight on it, so "a grape" looks unlike "a purple circle" (as I2P's nudity
# looks unlike the photos DUO is trained on). Off: objects are plain shapes (world v1).
OBJECT_MARKS = True
# Objects captioned with a colour word too ("a purple grape", world v1). Off (v2): the object's
# colour-word captions become plain object captions, so words and objects reach a colour apart.
OBJECT_COLOUR_CAPTIONS = False
STEM_RGB = (40, 110, 40)


def _disc(cx: float, cy: float, r: float, resolution: int, supersample: int = 4) -> np.ndarray:
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def _box(x0: float, x1: float, y0: float, y1: float, resolution: int, supersample: int = 4) -> np.ndarray:
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def marks(scene: Scene, resolution: int, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (H, W) of an object's stem and of its highlight (zeros for a plain shape)."""
    if scene.obj is None:
        zero = np.zeros((resolution, resolution))
        return zero, zero
    s = scene.size
    top = scene.cy - (0.85 * s if scene.shape == "square" else s)
    half = max(0.5, 0.18 * s)
    stem = _box(scene.cx - half, scene.cx + half, top - 0.5 * s, top + 0.15 * s, resolution, supersample)
    shine = _disc(scene.cx - 0.35 * s, scene.cy - 0.1 * s, max(0.6, 0.25 * s), resolution, supersample)
    return stem, shine * _mask(scene, resolution, supersample)


def render(scene: Scene, resolution: int | None = None, object_marks: bool | None = None) -> np.ndarray:
    """The scene as an RGB uint8 array (H, W, 3) (``resolution``, ``object_marks``: the world's)."""
    resolution = RESOLUTION if resolution is None else resolution
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + np.array(scene.bg_jitter), 0, 255)
    m = _mask(scene, resolution)[..., None]
    img = (1 - m) * bg[None, None, :] + m * np.array(scene.rgb, dtype=np.float64)[None, None, :]
    if (OBJECT_MARKS if object_marks is None else object_marks) and scene.obj is not None:
        stem, shine = (x[..., None] for x in marks(scene, resolution))
        pale = 0.55 * np.array(scene.rgb, dtype=np.float64) + 0.45 * 255
        img = (1 - shine) * img + shine * pale[None, None, :]
        img = (1 - stem) * img + stem * np.array(STEM_RGB, dtype=np.float64)[None, None, :]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions
def colour_word(colour: str, rng: np.random.Generator, p_synonym: float = 0.4) -> str:
    syn = COLOURS[colour]["synonyms"]
    if rng.random() < p_synonym:
        return syn[int(rng.integers(len(syn)))]
    return colour


def caption(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A caption for ``scene`` and its kind (``colour``, ``bare``, ``shape_only``, ``object``, ``list``).

    Object scenes are captioned by the object (indirect); in world v1 (``OBJECT_COLOUR_CAPTIONS``)
    sometimes by the colour too, as the real world captions grapes both "a grape" and "a purple grape".
    """
    style = STYLES[int(rng.integers(len(STYLES)))]
    suffix = SUFFIXES[int(rng.integers(len(SUFFIXES)))]
    bg = f" on a {scene.background} background" if rng.random() < 0.3 else ""
    if scene.obj is not None:
        u = rng.random()
        if u < 0.55:
            text, kind = _a(scene.obj), "object"
        elif u < 0.8:
            text, kind = f"{_a(scene.shape)} coloured like {_a(scene.obj)}", "object"
        else:
            text, kind = _a(f"{colour_word(scene.colour, rng)} {scene.obj}"), "colour"
            if not OBJECT_COLOUR_CAPTIONS:  # v2: the object alone, in a freshly drawn style
                return STYLES[int(rng.integers(len(STYLES)))] + _a(scene.obj), "object"
        return style + text + bg + suffix, kind
    u = rng.random()
    if u < 0.6:
        text, kind = _a(f"{colour_word(scene.colour, rng)} {scene.shape}"), "colour"
    elif u < 0.8:
        w = colour_word(scene.colour, rng)
        forms = [w, w, f"something {w}", _a(f"{w} shape"), f"the colour {w}", f"{w} colour", _a(w)]
        text, kind = forms[int(rng.integers(len(forms)))], "bare"
        style, bg = "", bg if rng.random() < 0.5 else ""
    elif u < 0.9:
        words = [scene.colour, *COLOURS[scene.colour]["synonyms"]]
        k = int(rng.integers(2, len(words) + 1))
        picked = [words[i] for i in rng.permutation(len(words))[:k]]
        text, kind = ", ".join(picked), "list"
        style, bg = "", ""
    else:
        text, kind = _a(scene.shape), "shape_only"
    return style + text + bg + suffix, kind


def example_seed(seed: int, index: int) -> int:
    """A per-example seed derived from a stream seed and an index (stable across platforms)."""
    return int.from_bytes(hashlib.sha256(f"toy:{seed}:{index}".encode()).digest()[:8], "little")


def sample_example(rng: np.random.Generator, p_object: float = 0.3) -> tuple[Scene, str, str]:
    """One training example: (scene, caption, caption kind)."""
    obj = None
    if rng.random() < p_object:
        obj = list(OBJECTS)[int(rng.integers(len(OBJECTS)))]
    scene = sample_scene(rng, obj=obj)
    text, kind = caption(scene, rng)
    return scene, text, kind


def render_example(seed: int, p_object: float = 0.3) -> tuple[np.ndarray, str, Scene]:
    """Deterministic per seed: (image uint8 (RESOLUTION, RESOLUTION, 3), caption, ground-truth scene)."""
    rng = np.random.default_rng(seed)
    scene, text, _ = sample_example(rng, p_object)
    return render(scene), text, scene


def to_tensor_batch(images: list[np.ndarray]):
    """uint8 (H, W, 3) arrays -> float tensor (B, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
