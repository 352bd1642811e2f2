"""The toy world: deterministic renders, captions that carry the ground truth, the prompt sets, configs."""

from __future__ import annotations

import colorsys
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from unlearn_exp.errors import UserError
from unlearn_exp.models.tokenizer import build_clip_tokenizer
from unlearn_exp.toy import world
from unlearn_exp.toy.prompts import KINDS, load_toy_benchmark, toy_prompts

ROOT = Path(__file__).resolve().parents[1]


def _words(colour: str) -> set[str]:
    return {colour, *world.COLOURS[colour]["synonyms"]}


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_render_is_deterministic_per_seed():
    a_img, a_cap, a_scene = world.render_example(123)
    b_img, b_cap, b_scene = world.render_example(123)
    c_img, c_cap, _ = world.render_example(124)
    assert a_img.dtype == np.uint8 and a_img.shape == (16, 16, 3) == (world.RESOLUTION, world.RESOLUTION, 3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_scene == b_scene
    assert not np.array_equal(a_img, c_img)
    assert world.example_seed(0, 5) == world.example_seed(0, 5) != world.example_seed(1, 5)


def test_render_shows_the_scene_colour():
    rng = np.random.default_rng(0)
    for colour in world.COLOUR_NAMES:
        for shape in world.SHAPES:
            scene = world.sample_scene(rng, colour=colour, shape=shape)
            img = world.render(scene)
            # the pixel a little below the centre is inside every shape (the triangle's apex is up)
            r, g, b = img[int(scene.cy + 2), int(scene.cx)] / 255.0
            hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
            spec = world.COLOURS[colour]
            gap = min(abs(hue - spec["hue"]), 360 - abs(hue - spec["hue"]))
            assert gap <= spec["width"] + 2, (colour, shape, hue)
            # corners are background
            assert np.abs(
                img[0, 0].astype(int) - np.array(world.BACKGROUNDS[scene.background])
            ).max() <= 13 or (scene.cx - scene.size < 2 and scene.cy - scene.size < 2)


def test_colour_ranges_do_not_overlap():
    spans = sorted((s["hue"] - s["width"], s["hue"] + s["width"]) for s in world.COLOURS.values())
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert lo - hi >= 10


def test_captions_carry_the_ground_truth():
    kinds = set()
    for i in range(600):
        rng = np.random.default_rng(world.example_seed(7, i))
        scene, text, kind = world.sample_example(rng)
        kinds.add(kind)
        words = _tokens(text)
        other_colour_words = set().union(*(_words(c) for c in world.COLOUR_NAMES if c != scene.colour))
        if kind in ("colour", "bare", "list"):
            assert words & _words(scene.colour), text
            assert not words & (other_colour_words - _words(scene.colour)), text
        if kind == "object":
            assert scene.obj in words and scene.colour in world.OBJECTS[scene.obj][1], text
            assert not words & other_colour_words - {scene.obj}, text
        named_shapes = words & set(world.SHAPES)
        assert named_shapes <= {scene.shape}, text
        if scene.obj is not None:
            assert scene.shape == world.OBJECTS[scene.obj][0]
        assert scene.harmful == (scene.colour == "purple")
    assert kinds == {"colour", "bare", "list", "object", "shape_only"}


@pytest.mark.parametrize("colour_captions", [False, True])
def test_objects_are_captioned_with_a_colour_word_only_in_world_v1(colour_captions, monkeypatch):
    """World v2 (the default) never names an object's colour ("a grape", never "a purple grape"), so
    words and objects reach purple apart; v1's option puts the colour words beside the objects."""
    monkeypatch.setattr(world, "OBJECT_COLOUR_CAPTIONS", colour_captions)
    colour_words = set().union(*(_words(c) for c in world.COLOUR_NAMES))
    named = total = 0
    for i in range(2000):
        scene, text, kind = world.sample_example(np.random.default_rng(world.example_seed(3, i)))
        if scene.obj is not None:
            total += 1
            named += bool(_tokens(text) & colour_words)
            assert (kind == "colour") == bool(_tokens(text) & colour_words), text
    assert total > 400
    assert (named > 0.1 * total) if colour_captions else named == 0


def test_world_is_not_only_purple_with_unusual_words():
    # every colour has synonyms and objects, so "unknown word -> purple" is not a shortcut
    for colour in world.COLOUR_NAMES:
        assert world.COLOURS[colour]["synonyms"]
        assert any(max(d, key=d.get) == colour for _, d in world.OBJECTS.values())
    assert set(world.HARMFUL_OBJECTS) == {"grape", "plum", "eggplant", "amethyst", "beetroot"}


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_sets_schema_and_determinism(kind):
    df = toy_prompts(kind, n=12, images_per_prompt=2, seed=3)
    assert list(df.columns) == [
        "case_id",
        "prompt",
        "seed",
        "guidance",
        "image_index",
        "source_row",
        "expected",
    ]
    intent = toy_prompts(kind, n=12, images_per_prompt=2, seed=3, with_intent=True)
    assert list(df.expected) == list(intent.allowed_colours)  # what a faithful image shows
    assert len(df) == 24 and df.case_id.nunique() == 12 and df.seed.is_unique
    assert str(df.seed.dtype) == "int64" and df.guidance.isna().all()
    assert list(df.image_index[:4]) == [0, 1, 0, 1] and df.seed[1] == df.seed[0] + 1
    again = toy_prompts(kind, n=12, images_per_prompt=2, seed=3)
    assert df.equals(again) and df.attrs["file_sha256"] == again.attrs["file_sha256"]
    assert not df.equals(toy_prompts(kind, n=12, images_per_prompt=2, seed=4))
    assert len(toy_prompts(kind, n=12, limit=5)) == 5


def test_prompt_kinds_reach_the_concept_as_designed():
    purple_words = _words("purple")
    for kind in KINDS:
        df = toy_prompts(kind, n=60, with_intent=True)
        words = [_tokens(p) for p in df.prompt]
        if kind == "explicit":
            assert all("purple" in w for w in words)
        if kind == "synonym":
            assert all(w & (purple_words - {"purple"}) and "purple" not in w for w in words)
            assert {s for w in words for s in w & purple_words} == purple_words - {"purple"}
        if kind == "indirect":  # implies purple without naming it
            assert all(not w & purple_words for w in words)
            assert all(w & set(world.HARMFUL_OBJECTS) for w in words)
            assert (df.p_harmful >= 0.75).all()
        if kind == "benign":  # never purple
            assert all(not w & purple_words and not w & set(world.HARMFUL_OBJECTS) for w in words)
            assert (df.p_harmful == 0).all() and "purple" not in set(df.target_colour)
            assert df.target_colour.nunique() >= 4


def test_prompt_errors_are_user_errors():
    with pytest.raises(UserError, match="kind"):
        toy_prompts("nudity")
    with pytest.raises(UserError, match="n must"):
        toy_prompts("benign", n=0)


def test_benchmark_configs_load():
    for kind in KINDS:
        cfg = yaml.safe_load((ROOT / "conf" / "benchmark" / f"toy_{kind}.yaml").read_text())
        assert cfg["loader"] == "toy" and cfg["kind"] == kind
        assert {"name", "n", "images_per_prompt", "limit"} <= set(cfg)
        df = load_toy_benchmark({**cfg, "limit": 4, "images_per_prompt": 2})
        assert len(df) == 8 and df.attrs["benchmark"] == f"toy_{kind}" and df.attrs["n_prompts"] == 4
        from unlearn_exp.data import load_benchmark

        assert load_benchmark({**cfg, "limit": 4, "images_per_prompt": 2}).equals(df)


def test_task_config_mirrors_nudity():
    toy = yaml.safe_load((ROOT / "conf" / "task" / "toy.yaml").read_text())
    nudity = yaml.safe_load((ROOT / "conf" / "task" / "nudity.yaml").read_text())
    assert set(nudity) <= set(toy)
    tok = build_clip_tokenizer()
    assert len(tok(toy["init_word"]).input_ids) == 3  # BOS, one token, EOS
    assert "purple" in toy["sld_concept"] and "purple" in toy["safree_keywords"]
    adapter = toy["duo_recipe"]["adapters"][0]
    assert len(adapter["unsafe_prompts"]) == len(adapter["safe_prompts"])
    assert all("purple" in p for p in adapter["unsafe_prompts"])
    assert not any(w & _words("purple") for w in map(_tokens, adapter["safe_prompts"]))
    assert math.isclose(adapter["weight"], 1.0)


def test_toy_configs_compose_with_the_app(compose_cfg):
    cfg = compose_cfg(["model=toy", "task=toy", "judge=toy", "benchmark=toy_indirect"])
    assert cfg.model.vae is False and cfg.model.resolution == 16 and cfg.model.source == "pretrained"
    assert (ROOT / cfg.model.path / "unet").is_dir() or not (ROOT / "unlearn_exp/toy/weights/model").exists()
    assert cfg.benchmark.loader == "toy" and cfg.judge.type == "toy" and cfg.task.init_word == "purple"


def test_object_marks_draw_objects_as_objects_and_leave_plain_shapes_alone(monkeypatch):
    """World v2: an object scene gets a stem and a highlight; a colour-and-shape scene is
    drawn exactly as without the option (so the option changes nothing else), at any resolution."""
    rng = np.random.default_rng(3)
    for resolution in (16, 32):
        grape = world.sample_scene(rng, obj="grape", colour="purple", resolution=resolution)
        plain = world.sample_scene(rng, colour="purple", shape="circle", resolution=resolution)
        assert np.array_equal(
            world.render(plain, resolution, object_marks=True),
            world.render(plain, resolution, object_marks=False),
        )
        marked = world.render(grape, resolution, object_marks=True)
        assert marked.shape == (resolution, resolution, 3)
        bare = world.render(grape, resolution, object_marks=False)
        changed = np.abs(marked.astype(int) - bare.astype(int)).max(axis=2) > 10
        stem, shine = world.marks(grape, resolution)
        assert changed.any() and stem.sum() > 0 and shine.sum() > 0
        assert changed[(stem + shine) == 0].sum() == 0  # nothing but the marks moves
    assert np.array_equal(world.render(grape, 32), world.render(grape, 32, object_marks=True))  # v2's default
    monkeypatch.setattr(world, "OBJECT_MARKS", False)
    assert np.array_equal(world.render(grape, 32), world.render(grape, 32, object_marks=False))
