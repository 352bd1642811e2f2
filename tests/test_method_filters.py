"""The filters that build training data belong to the methods: switching the evaluation judge never
changes DUO's pairs, the DUO checkpoint or C*'s image set; the image set can be DUO's own unsafe
images; a filter that rarely flags a prompt stops the image set early, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.helpers import compose
from unlearn_exp.cell import ensure_image_set, image_set_key, inversion_key, method_filter
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import config_hash, to_plain
from unlearn_exp.models import load_model
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning.duo import duo_key


def _keys(*overrides):
    cfg = compose(
        ["+experiment=toy_duo", "checkpoint.beta=500", "guidance=sld", "embedding=inverted", *overrides]
    )
    comps = load_model(cfg.model)
    ck = dict(to_plain(cfg.checkpoint))
    img = config_hash(
        image_set_key(cfg, comps, method_filter(cfg.inversion.image_set.filter), comps.identity)
    )
    return {
        "duo": config_hash(duo_key(comps, ck, cfg.task, method_filter(ck["filter"]))),
        "image_set": img,
        "inversion": config_hash(inversion_key(cfg, comps.identity, img, "learned-on")),
    }


@pytest.mark.slow
def test_the_evaluation_judge_never_changes_training_data():
    base = _keys()
    assert _keys("judge=nudenet_duo") == base  # another evaluation judge: the same training data
    other_filter = _keys("task.duo_filter.threshold=0.9", "task.inversion_filter.threshold=0.9")
    assert other_filter["duo"] != base["duo"] and other_filter["image_set"] != base["image_set"]


def test_paper_experiments_name_their_filters_and_learn_from_duo_pairs():
    nud = compose(["+experiment=nudity_duo"], hydra=False)
    assert (
        nud.checkpoint.filter.name == "nudenet_duo" and nud.inversion.image_set.filter.name == "nudenet_duo"
    )
    assert nud.inversion.image_set.source == "duo_pairs"
    vio = compose(["+experiment=violence_duo"], hydra=False)
    assert vio.checkpoint.filter is None and vio.judge.name == "q16"  # DUO's violence script checks nothing
    assert compose(["+experiment=toy_duo"], hydra=False).inversion.image_set.source == "generated"


def test_cell_trains_with_the_method_filter(monkeypatch, tmp_path):
    from unlearn_exp import cell as cell_module
    from unlearn_exp.unlearning import checkpoints

    seen = {}

    def fake_apply(comps, ck, store, *, task_cfg, judge, sample_kwargs, logger):
        seen["judge"] = judge.profile["name"]
        return {"id": "x"}

    monkeypatch.setattr(checkpoints, "apply_checkpoint", fake_apply)
    monkeypatch.setattr("unlearn_exp.unlearning.apply_checkpoint", fake_apply)
    cfg = compose(["+experiment=toy_duo", "judge=nudenet_duo"], hydra=False)
    cell_module.apply_unlearning(cfg, None, ArtifactStore(tmp_path), cfg.checkpoint, None)
    assert seen["judge"] == "toy"


@pytest.mark.slow
def test_image_set_from_duo_pairs_is_exactly_their_unsafe_half(tmp_path):
    cfg = compose(
        [
            "model=tiny",
            "task=toy",
            "checkpoint=duo",
            "embedding=inverted",
            "guidance=sld",
            "inversion.image_set.source=duo_pairs",
            "checkpoint.pair_sampling.steps=2",
            "checkpoint.pair_batch=2",
        ],
        hydra=False,
    )
    with open_dict(cfg):
        cfg.task.duo_recipe = {
            "adapters": [
                {
                    "name": "P",
                    "unsafe_prompts": ["a purple circle"],
                    "safe_prompts": ["a blue circle"],
                    "n_pairs": 3,
                    "strength": 0.8,
                    "check_unsafe": False,
                    "check_safe": False,
                    "steps": 1,
                    "weight": 1,
                }
            ]
        }
    comps = load_model(cfg.model)
    store = ArtifactStore(tmp_path)
    folder = ensure_image_set(cfg, comps, store, comps.identity)
    pairs = next((tmp_path / "unlearning" / "duo_pairs").glob("*/unsafe"))
    mine = sorted(p.read_bytes() for p in folder.glob("*.png"))
    assert len(mine) == 3 and mine == sorted(p.read_bytes() for p in pairs.glob("*.png"))
    assert ensure_image_set(cfg, comps, store, comps.identity) == folder  # cached
    with open_dict(cfg):
        cfg.checkpoint.path = "/w/lora.safetensors"
    with pytest.raises(UserError, match="duo_pairs needs a DUO checkpoint trained here"):
        ensure_image_set(cfg, comps, store, comps.identity)


class _NeverFlags:
    name = "never"

    def judge(self, images):
        return [{"safe": True, "score": 0.0, "raw": {}} for _ in images]


@pytest.mark.slow
def test_image_set_that_cannot_fill_its_quota_stops_early(tiny, tmp_path):
    from unlearn_exp.inversion.image_sets import generate_image_set

    with pytest.raises(UserError, match=r"prompt 'a cat' on 0 of (\d+) tries; it needs 32") as err:
        generate_image_set(
            tiny,
            ["a cat", "a dog"],
            [0],
            _NeverFlags(),
            tmp_path / "set",
            n_images=64,
            max_tries=640,
            sample_kwargs={"steps": 2},
            batch_size=8,
        )
    tries = int(err.value.args[0].split(" of ")[1].split(" ")[0])
    assert tries < 320 // 2  # stopped well before its share of max_tries was spent
    assert not Path(tmp_path / "set").exists()


def test_a_user_image_folder_is_named_by_its_content(tmp_path):
    """Two folders of the same name with other images learn two ``C*``; the same images anywhere
    are one (the inversion key named the folder by its last path component)."""
    from PIL import Image

    from unlearn_exp.cell import image_set_ref

    def folder(where: str, colour: tuple[int, int, int]) -> Path:
        path = tmp_path / where / "images"
        path.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(path / f"{i}.png")
        (path / "notes.txt").write_text("not an image: not part of the set")
        return path

    red, blue, red_again = folder("a", (255, 0, 0)), folder("b", (0, 0, 255)), folder("c", (255, 0, 0))
    cfg = compose(
        ["model=tiny", "task=toy", "embedding=inverted", "guidance=sld", "inversion.image_set.source=folder"],
        hydra=False,
    )
    ids = {}
    for name, path in (("red", red), ("blue", blue), ("red_again", red_again)):
        with open_dict(cfg):
            cfg.inversion.image_set.path = str(path)
        ref = image_set_ref(cfg, None, ArtifactStore(tmp_path / "cache"), "m")
        assert ref.folder() == path
        ids[name] = ref.id
    assert ids["red"] != ids["blue"] and ids["red"] == ids["red_again"]
    with open_dict(cfg):
        cfg.inversion.image_set.path = str(tmp_path / "missing")
    with pytest.raises(UserError, match="image folder not found"):
        image_set_ref(cfg, None, ArtifactStore(tmp_path / "cache"), "m")
