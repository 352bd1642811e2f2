"""The contracts every registered implementation keeps, parametrised over the registries: a method
registered later (a built-in or a plugin) joins these tests and must declare its tiny settings here.

Guidance and unlearning methods run on every model family they declare (``families``; tiny SD v1 and
tiny SD3 components):

- guidance: batch independence; classifier-free guidance when its effect is switched off;
- judges: one verdict per image in order, independent of the batch; the profile hash is stable and
  follows what decides a verdict; bad input is one ``UserError`` line;
- unlearning methods: applying changes the UNet (``original`` leaves it), a second application is
  served from the cache, and the written files load back through ``checkpoint.path`` to the same
  UNet.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import Q16, _probe_prompts, compose, plant
from tests.helpers.nudenet import red_minus_blue_classifier
from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import make_judge
from unlearn_exp.families import FAMILIES
from unlearn_exp.guidance import Concept, make_guidance
from unlearn_exp.guidance.base import Guidance
from unlearn_exp.hashing import config_hash
from unlearn_exp.models import build_tiny, build_tiny_sd3
from unlearn_exp.registry import GUIDANCE, JUDGES, UNLEARNING, load_plugins
from unlearn_exp.sampling import sample
from unlearn_exp.settings import declarations
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint

load_plugins()

# the tiny model of each family
TINY = {"sd1": build_tiny, "sd3": lambda: build_tiny_sd3(seed=0)}


def _on_families(group: str, names: list[str]) -> list[tuple[str, str]]:
    """(method, family) for every family a method declares (undeclared: every family)."""
    declared = {d.name: d.families for d in declarations(group)}
    return [(n, f) for n in names for f in (declared.get(n) or tuple(FAMILIES)) if f in TINY]


@pytest.fixture(scope="module")
def tiny_sd3():
    return build_tiny_sd3(seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- guidance
# per method: overrides that switch its effect off, the negative prompt of the classifier-free
# guidance that is left (None: the empty prompt), and overrides under which it acts within 3 steps
GUIDANCE_OFF = {
    "none": ([], None, []),
    "sld": (["guidance.guidance_scale=0"], None, ["guidance.warmup_steps=0"]),  # no safety term
    # no token flagged (nothing projected) and no self-validating filter: CFG with SAFREE's
    # negative prompt, the keywords
    "safree": (["guidance.alpha=1e9", "guidance.svf=false"], "keywords", []),
}


def _guidance(name: str, *overrides: str) -> Guidance:
    cfg = compose([f"guidance={name}", "task=nudity", *overrides], hydra=False)
    return make_guidance(cfg.guidance, cfg.task, Concept())


@pytest.mark.parametrize(("name", "family"), _on_families("guidance", GUIDANCE.names()))
@pytest.mark.slow
def test_guidance_is_batch_independent(name, family, tiny, tiny_sd3):
    tiny = {"sd1": tiny, "sd3": tiny_sd3}[family]
    g = _guidance(name)
    assert g.describe()["name"] == name
    prompts, seeds = ["a naked woman on a beach", "a red car", "a bowl of fruit"], [5, 6, 7]
    with torch.no_grad():
        kw = {"steps": 3, "scheduler": FAMILIES[tiny.family].samplers[0]}
        together = sample(tiny, prompts, seeds, g, **kw).images
        alone = torch.cat([sample(tiny, [p], [s], g, **kw).images for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("name", "family"), _on_families("guidance", GUIDANCE.names()))
@pytest.mark.slow
def test_guidance_switched_off_is_classifier_free_guidance(name, family, tiny, tiny_sd3):
    tiny = {"sd1": tiny, "sd3": tiny_sd3}[family]
    assert name in GUIDANCE_OFF, f"declare the overrides that switch '{name}' off in GUIDANCE_OFF"
    overrides, negative, acting = GUIDANCE_OFF[name]
    off = _guidance(name, *overrides)
    on = _guidance(name, *acting)
    prompts, seeds = ["a naked woman on a beach", "a red car"], [3, 4]
    if negative == "keywords":
        negative = ", ".join(compose(["task=nudity"], hydra=False).task.safree_keywords)
    negatives = None if negative is None else [negative] * len(prompts)
    kw = {"steps": 3, "scheduler": FAMILIES[tiny.family].samplers[0]}
    with torch.no_grad():
        a = sample(tiny, prompts, seeds, off, **kw).images
        cfg = sample(tiny, prompts, seeds, Guidance(), negative_prompts=negatives, **kw).images
        b = sample(tiny, prompts, seeds, on, **kw).images
    torch.testing.assert_close(a, cfg, atol=1e-5, rtol=0)
    if name != "none":  # switched on, the method does something on this prompt
        assert (b - cfg).abs().max() > 1e-4


# ----------------------------------------------------------------------------- judges
def _judge_cfg(name: str, tmp_path, open_clip_dir) -> dict:  # noqa: F811
    if name == "q16":  # a tiny CLIP with planted prompt rows (CLIP ViT-L/14 is not here)
        _probe_prompts(tmp_path, 16)
        base = {
            **Q16,
            "backend": "open_clip",
            "open_clip_model": f"local-dir:{open_clip_dir}",
            "device": "cpu",
        }
        return plant(base, tmp_path, unsafe_index=0)[0]
    if name == "nudenet_classifier":  # its file is not shipped: a small model with its contract
        pytest.importorskip("onnx")
        model = red_minus_blue_classifier(tmp_path / "classifier_model.onnx")
        return {**preset("judge", "nudenet_classifier"), "model_path": str(model)}
    configs = {"nudenet": "nudenet_duo", "toy": "toy"}
    assert name in configs, f"declare how the contract builds judge type '{name}'"
    return OmegaConf.to_container(compose([f"judge={configs[name]}"], hydra=False).judge)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB") for _ in range(3)]


@pytest.mark.parametrize("name", JUDGES.names())
def test_judge_contract(name, tmp_path, open_clip_dir):  # noqa: F811
    cfg = _judge_cfg(name, tmp_path, open_clip_dir)
    judge = make_judge(cfg, cache=False)
    images = _images()
    out = judge.judge(images)
    assert len(out) == 3 and judge.judge([]) == []
    for v in out:
        assert isinstance(v["safe"], bool) and isinstance(float(v["score"]), float)
        json.dumps(v.get("raw"))  # JSON-able
    alone = [judge.judge([im])[0] for im in reversed(images)][::-1]
    assert [v["safe"] for v in alone] == [v["safe"] for v in out]
    assert np.allclose([v["score"] for v in alone], [v["score"] for v in out], atol=1e-5)

    # the profile hash: the profile's own content (less the file's place), the same when rebuilt,
    # another when what decides a verdict changes
    prof = judge.profile
    assert prof["hash"] == config_hash({k: v for k, v in prof.items() if k not in ("hash", "model_file")})
    assert make_judge(dict(cfg), cache=False).hash == judge.hash
    assert make_judge({**cfg, "threshold": 0.987}, cache=False).hash != judge.hash

    # bad input: one line each
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for bad, match in [
        (broken, "cannot decode image"),
        (tmp_path / "absent.png", "image not found"),
        (np.zeros((4, 4), np.uint8), "uint8 RGB"),
    ]:
        with pytest.raises(UserError, match=match) as err:
            judge.judge([images[0], bad])
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- unlearning methods
# the tiny settings each method is built with in the contract (a new method adds its own; the
# built-in ones start from their YAML's values)
UNLEARNING_TINY = {
    "original": preset("checkpoint", "original"),
    "duo": {
        **preset("checkpoint", "duo", filter=None),
        "beta": 250,
        "batch": 2,
        "rank": 4,
        "alpha": 4,
        "steps": 2,
        "checkpoint_every": 1,
        "lr_override": 1e-2,
        "pair_sampling": {"scheduler": "ddim", "steps": 2},
        "recipes": {
            "nudity": {
                "adapters": [
                    {
                        "name": "T",
                        "unsafe_prompts": ["a naked cat"],
                        "safe_prompts": ["a dressed cat"],
                        "n_pairs": 2,
                        "strength": 0.75,
                        "check_unsafe": False,
                        "check_safe": False,
                    }
                ]
            }
        },
    },
    "esd": {
        **preset("checkpoint", "esd"),
        "variant": "esd-x",
        "lr": 1e-3,
        "eta": 1.0,
        "start_guidance": 3.0,
        "ddim_steps": 4,
        "steps": 2,
        "seed": 0,
        "checkpoint_every": 1,
        "concept": {"nudity": "nudity"},
    },
    "uce": {
        **preset("checkpoint", "uce"),
        "erase": {"nudity": ["nudity"]},
        "preserve": ["a cat"],
        "preserve_scale": 0.7,
    },
    "spm": {
        **preset("checkpoint", "spm"),
        "steps": 2,
        "max_denoising_steps": 3,
        "sampling_batch_size": 2,
        "lr_warmup_steps": 1,
        "lr": 1e-2,
        "checkpoint_every": 1,
    },
    # published files only: the contract writes one in the method's layout
    "unet_folder": "load-only",
    "advunlearn": "load-only",
}


def _published(name: str, where, family: str = "sd1") -> str:
    """A file or folder in the published layout of a load-only method, changing the tiny model."""
    from tests.helpers import text_encoder_folder, unet_folder

    write = {"unet_folder": unet_folder, "advunlearn": text_encoder_folder}[name]
    return str(write(where / name, family=family))


# the settings a method is built with on tiny SD3 components, where they differ from SD v1's
UNLEARNING_TINY_SD3 = {
    "duo": {
        **UNLEARNING_TINY["duo"],
        **{k: preset("checkpoint", "duo_sd3")[k] for k in ("target_modules", "text_length", "lr_base")},
        "pair_sampling": {"scheduler": "flow_euler", "steps": 2},
    },
}


def _unet_out(comps) -> torch.Tensor:
    """The denoiser's output for one fixed input (the UNet's, or SD3's transformer's)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, comps.denoiser.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        c = comps.condition_prompts(["a naked cat"])
        return comps.denoise(x, torch.tensor(500), c)


@pytest.mark.parametrize(("name", "family"), _on_families("checkpoint", UNLEARNING.names()))
@pytest.mark.slow
def test_unlearning_method_contract(name, family, tmp_path):
    assert name in UNLEARNING_TINY, f"declare the tiny settings of unlearning method '{name}'"
    cfg = UNLEARNING_TINY[name] if family == "sd1" else UNLEARNING_TINY_SD3.get(name, UNLEARNING_TINY[name])
    build_tiny = TINY[family]
    task = {"name": "nudity"}
    before = _unet_out(build_tiny())
    if cfg == "load-only":  # changes the model, the same way each time, from the user's file
        user = preset("checkpoint", name, path=_published(name, tmp_path, family))
        outs = []
        for _ in range(2):
            comps = build_tiny()
            apply_checkpoint(comps, user, ArtifactStore(tmp_path / "cache"), task_cfg=task)
            outs.append(_unet_out(comps))
        assert (outs[0] - before).abs().max() > 1e-6
        torch.testing.assert_close(outs[0], outs[1])
        return

    applied = build_tiny()
    store = ArtifactStore(tmp_path / "cache")
    info = apply_checkpoint(applied, cfg, store, task_cfg=task)
    after = _unet_out(applied)
    if name == "original":
        torch.testing.assert_close(after, before)
        assert store.built == []
        return
    assert (after - before).abs().max() > 1e-6, f"{name} left the UNet unchanged"
    assert store.built and info["files"]

    again = build_tiny()  # served from the cache: nothing built, the same UNet
    store2 = ArtifactStore(tmp_path / "cache")
    info2 = apply_checkpoint(again, cfg, store2, task_cfg=task)
    assert store2.built == [] and info2["id"] == info["id"]
    torch.testing.assert_close(_unet_out(again), after)

    loaded = build_tiny()  # the written files, loaded as a user's published checkpoint
    files = info["files"] if len(info["files"]) > 1 else info["files"][0]
    user = {**cfg, "path": files}  # DUO: beta is then a label
    apply_checkpoint(loaded, user, ArtifactStore(tmp_path / "c3"), task_cfg=task)
    torch.testing.assert_close(_unet_out(loaded), after, atol=1e-5, rtol=0)
