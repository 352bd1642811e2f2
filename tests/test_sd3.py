"""The SD3 family on tiny random components (diffusers' own SD3 test sizes): conditioning and sampling
equal to diffusers' ``StableDiffusion3Pipeline``, folders saved and loaded, T5 off, one-line refusals,
SLD on velocities, and a grid cell end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import compose
from unlearn_exp.config import typed_preset
from unlearn_exp.errors import UserError
from unlearn_exp.guidance.config import SAFREEConfig, SLDConfig
from unlearn_exp.guidance.sld import SLD
from unlearn_exp.models import build_tiny_sd3, load_model, save_components
from unlearn_exp.sampling import initial_noise, sample
from unlearn_exp.settings import declarations
from unlearn_exp.validate import validate

PROMPTS = ["a photo of a nude woman on a beach", "a red circle"]
SEEDS = [3, 4]


# DUO on SD3 at smoke size: its pair set (unchecked: a random model draws no nudity), one training step
SMOKE_DUO = [
    "+debug=default",
    "debug.n_pairs=2",
    "debug.train_steps=1",
    "debug.sample_steps=2",
    "checkpoint.batch=2",
    "checkpoint.train_resolution=32",
    "checkpoint.recipes.nudity.adapters.0.check_unsafe=false",
    "checkpoint.recipes.nudity.adapters.0.check_safe=false",
]


def _cell_inputs(tmp_path: Path, prompts: list[str]) -> list[str]:
    """A prompt file of ``prompts`` for the benchmark and PP, a stand-in AlexNet trunk (LPIPS' code path
    with random features), 2 sampling steps and the run's folders: the overrides of a smoke cell."""
    import torchvision

    csv = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": prompts, "evaluation_seed": range(1, len(prompts) + 1)}).to_csv(csv, index=False)
    torch.manual_seed(0)
    trunk = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet().state_dict(), trunk)
    return [
        "benchmark=prompts_file",
        f"benchmark.path={csv}",
        f"pp.prompts.path={csv}",
        "pp.prompts.expected_prompts=null",
        f"pp.metric.trunk_path={trunk}",
        "sampling.steps=2",
        "sampling.batch_size=2",
        "sampling.progress=false",
        f"paths.root_dir={tmp_path}",
        f"paths.output_root={tmp_path}",
    ]


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def sd3_no_t5():
    return build_tiny_sd3(seed=0, t5=False)


def _reference(comps, steps: int = 4, guidance_scale: float = 7.0, **kwargs):
    """diffusers' pipeline over the same modules, from the same initial noise: latents and images."""
    pipe = comps.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(SEEDS, comps.latent_shape())
    run = dict(num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise, **kwargs)
    latents = pipe(PROMPTS, output_type="latent", **run).images
    images = pipe(PROMPTS, output_type="pt", **run).images * 2 - 1
    return latents, images


@pytest.mark.parametrize("with_t5", [True, False])
def test_sampling_equals_diffusers_sd3_pipeline(sd3, sd3_no_t5, with_t5):
    comps = sd3 if with_t5 else sd3_no_t5
    out = sample(comps, PROMPTS, SEEDS, steps=4, scheduler="flow_euler", guidance_scale=7.0)
    latents, images = _reference(comps)
    assert (out.latents - latents).abs().max() <= 1e-5
    assert (out.images - images).abs().max() <= 1e-5


def test_conditioning_is_the_pipelines_encode_prompt(sd3):
    cond = sd3.condition_prompts(PROMPTS)
    seq, _, pooled, _ = sd3.to_diffusers().encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False
    )
    assert cond.sequence.shape == (2, 77 + 256, 32) and cond.pooled.shape == (2, 64)
    assert torch.equal(cond.sequence, seq) and torch.equal(cond.pooled, pooled)


def test_dynamic_shift_follows_the_scheduler_config():
    comps = build_tiny_sd3(seed=0, t5=False)
    comps.scheduler_config = {**comps.scheduler_config, "use_dynamic_shifting": True}
    out = sample(comps, PROMPTS, SEEDS, steps=3, scheduler="flow_euler", guidance_scale=7.0)
    latents, _ = _reference(comps, steps=3)
    assert (out.latents - latents).abs().max() <= 1e-5


def test_img2img_at_full_strength_is_sampling_from_noise(sd3_no_t5):
    images = torch.zeros(2, 3, 32, 32)
    full = sample(
        sd3_no_t5, PROMPTS, SEEDS, steps=3, scheduler="flow_euler", init_images=images, strength=1.0
    )
    plain = sample(sd3_no_t5, PROMPTS, SEEDS, steps=3, scheduler="flow_euler")
    assert torch.allclose(full.latents, plain.latents, atol=1e-6)
    half = sample(
        sd3_no_t5, PROMPTS, SEEDS, steps=4, scheduler="flow_euler", init_images=images, strength=0.5
    )
    assert not torch.allclose(half.latents, plain.latents)
    assert sd3_no_t5.img2img_start(50, 0.75) == 12  # diffusers' SD3 img2img: int(50 - 37.5)


def test_an_sd1_sampler_is_refused_in_one_line(sd3_no_t5):
    with pytest.raises(UserError, match="sampler 'ddim' does not run model .*flow_euler"):
        sample(sd3_no_t5, PROMPTS, SEEDS, steps=2, scheduler="ddim")


@pytest.mark.parametrize("with_t5", [True, False])
def test_a_saved_folder_loads_back_with_and_without_t5(sd3, tmp_path, with_t5):
    folder = save_components(sd3, tmp_path / "sd3")
    assert (folder / "transformer").is_dir() and (folder / "tokenizer_3" / "tokenizer.json").is_file()
    cfg = compose(
        ["model=sd3", f"model.path={folder}", "model.resolution=32", f"model.t5={with_t5}"], hydra=False
    )
    loaded = load_model(cfg.model)
    assert (loaded.text_encoder_3 is not None) == with_t5 and loaded.family == "sd3"
    assert loaded.identity.startswith("sd3:")
    ref = sd3 if with_t5 else dataclasses.replace(sd3, text_encoder_3=None, tokenizer_3=None)
    a = sample(loaded, PROMPTS, SEEDS, steps=2, scheduler="flow_euler")
    b = sample(ref, PROMPTS, SEEDS, steps=2, scheduler="flow_euler")
    assert torch.equal(a.latents, b.latents)


def test_an_sd3_folder_loads_straight_in_its_dtype(sd3, tmp_path):
    folder = save_components(sd3, tmp_path / "sd3")
    over = ["model=sd3", f"model.path={folder}", "model.resolution=32", "model.dtype=bfloat16"]
    loaded = load_model(compose(over, hydra=False).model)
    assert {next(m.parameters()).dtype for m in loaded.modules().values()} == {torch.bfloat16}
    out = sample(loaded, PROMPTS, SEEDS, steps=2, scheduler="flow_euler")
    assert torch.isfinite(out.images).all()


def test_missing_sd3_weights_stop_in_one_line_naming_the_folder(tmp_path):
    cfg = compose(["model=sd3", f"model.path={tmp_path / 'absent'}"], hydra=False)
    with pytest.raises(UserError, match="no folder at") as e:
        load_model(cfg.model)
    assert "\n" not in str(e.value)
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    cfg = compose(["model=sd3", f"model.path={tmp_path / 'partial'}"], hydra=False)
    with pytest.raises(UserError, match="lacks the subfolder.*text_encoder"):
        load_model(cfg.model)


def test_methods_not_ported_to_sd3_are_refused_before_any_work():
    for extra, what in [
        (["checkpoint=duo"], "on SD3 use checkpoint=duo_sd3"),
        (["sampling.scheduler=ddim"], "sampling.scheduler"),
    ]:
        with pytest.raises(UserError, match=what):
            validate(compose(["model=tiny_sd3", *extra], hydra=False))
    for guidance in ("none", "sld", "safree"):  # every guidance method runs on SD3
        validate(compose(["model=tiny_sd3", f"guidance={guidance}"], hydra=False))
    for method in ("uce", "esd", "spm", "unet_folder", "advunlearn"):  # and every unlearning method
        assert "sd3" in next(d.families for d in declarations("checkpoint") if d.name == method)


def test_a_method_declared_for_one_family_is_refused_on_another(monkeypatch):
    from unlearn_exp import settings

    d = next(d for d in declarations("checkpoint") if d.name == "uce")
    monkeypatch.setitem(settings._DECLARED, ("checkpoint", "uce"), dataclasses.replace(d, families=("sd1",)))
    with pytest.raises(UserError, match="checkpoint 'uce' does not run on the sd3 model family yet"):
        validate(compose(["model=tiny_sd3", "checkpoint=uce"], hydra=False))
    validate(compose(["model=tiny_sd3", "checkpoint=duo_sd3"], hydra=False))
    assert compose(["model=tiny_sd3"], hydra=False).sampling.scheduler == "flow_euler"
    assert compose([], hydra=False).sampling.scheduler == "dpmsolver++"  # SD v1 unchanged


def test_sld_on_velocities_is_three_branches_and_acts(sd3_no_t5):
    off = SLD("nudity", dataclasses.replace(typed_preset(SLDConfig, "sld"), preset="max", warmup_steps=50))
    on = SLD("nudity", dataclasses.replace(typed_preset(SLDConfig, "sld"), preset="max"))
    tokens = sd3_no_t5.tokenize(PROMPTS)
    state = on.prepare(sd3_no_t5, PROMPTS, tokens, None, 7.0, 3)
    assert state.n_branches == 3 and state.branches[2].pooled.shape == (2, 64)
    plain = sample(sd3_no_t5, PROMPTS, SEEDS, steps=3, scheduler="flow_euler", guidance_scale=7.0)
    gated = sample(sd3_no_t5, PROMPTS, SEEDS, off, steps=3, scheduler="flow_euler", guidance_scale=7.0)
    acted = sample(sd3_no_t5, PROMPTS, SEEDS, on, steps=3, scheduler="flow_euler", guidance_scale=7.0)
    assert torch.allclose(gated.latents, plain.latents, atol=1e-6)  # warm-up past the last step: CFG
    assert not torch.allclose(acted.latents, plain.latents, atol=1e-3)


@pytest.mark.slow
def test_a_duo_cell_runs_end_to_end_on_tiny_sd3(tmp_path):
    from unlearn_exp.cell import run_cell
    from unlearn_exp.evaluation import read_table

    inputs = _cell_inputs(tmp_path, [*PROMPTS, "a naked man"])
    over = [
        "model=tiny_sd3",
        "guidance=sld",
        "guidance.preset=max",
        "checkpoint=duo_sd3",
        *inputs,
        *SMOKE_DUO,
    ]
    cfg = compose(over, hydra=False)
    out = run_cell(cfg)
    row = read_table(Path(out["results"]) / "cells.parquet").iloc[0]
    assert row.n_images == 3 and row.guidance == "sld" and 0 <= row.dsr <= 1
    assert row.checkpoint_method == "duo" and row.beta == 500
    assert 0 < row.pp_coco < 1  # the LoRA and SLD change the images of the SD3 model
    loras = list(tmp_path.rglob("pytorch_lora_weights.safetensors"))
    assert len(loras) == 1 and loras[0].parent.name == "Nudity"


# ---- SAFREE on SD3: the official sdv3/ functions re-stated (jaehong31/SAFREE, sdv3/sdv3_pipeline.py)
SAFREE_KEYWORDS = ["nudity", "naked body", "sexual acts"]


def _official_projection_matrix(e):
    return e.float() @ torch.pinverse((e.T.float() @ e.float()).float()) @ e.T.float()


def _official_concepts(comps, words):
    t = comps.tokenizer_3(words, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    return comps.text_encoder_3(t.input_ids, attention_mask=t.attention_mask).last_hidden_state[:, 0, :]


def _official_masked(comps, prompt):
    ids = comps.tokenizer_3(
        prompt,
        padding="longest",
        max_length=256,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    n_real = ids.shape[1] - 2
    masked = ids.repeat(n_real, 1)
    for i in range(n_real):
        masked[i, i + 1] = 0
    return comps.text_encoder_3(masked, attention_mask=None).last_hidden_state[:, 0, :]


def _official_mask_to_onp(text_e, p_emb, ms, cs, alpha, max_length=333):
    n_t, dim = p_emb.shape
    i_m_cs = torch.eye(dim) - cs
    dist = torch.norm(i_m_cs.bfloat16() @ p_emb.T.bfloat16(), dim=0)
    means = torch.tensor([torch.mean(torch.cat((dist[:i], dist[i + 1 :]))) for i in range(n_t)])
    rm = (dist < (1.0 + alpha) * means).float()
    ones = torch.ones(max_length)
    ones[1 : n_t + 1] = rm
    new = (i_m_cs.bfloat16() @ ms.bfloat16() @ text_e.T.bfloat16()).T
    return torch.where(ones.unsqueeze(1).bool(), text_e, new)


@pytest.mark.parametrize("prompt", ["a photo of a nude woman on a beach", "red circle"])
def test_safree_official_mode_on_sd3_equals_the_official_functions(sd3, prompt):
    from unlearn_exp.guidance import make_guidance
    from unlearn_exp.guidance.base import Concept

    cfg = compose(["model=tiny_sd3", "guidance=safree", "guidance.compat=official"], hydra=False)
    cfg.guidance.keywords = SAFREE_KEYWORDS
    g = make_guidance(cfg.guidance, cfg.task, Concept())
    state = g.prepare(sd3, [prompt], sd3.tokenize([prompt]), None, 7.0, 4)
    text_e = sd3.condition_prompts([prompt]).sequence[0]
    p_emb = _official_masked(sd3, prompt)
    ms = _official_projection_matrix(p_emb.T)
    cs = _official_projection_matrix(_official_concepts(sd3, SAFREE_KEYWORDS).T)
    ref = _official_mask_to_onp(text_e, p_emb, ms, cs, alpha=0.01).to(text_e.dtype)
    assert torch.equal(state.extra["safe_e"][0], ref)
    negative = sd3.condition_prompts([", ".join(SAFREE_KEYWORDS)])  # the keywords, as sdv3/ overwrites it
    assert torch.equal(state.branches[0].sequence, negative.sequence)
    assert torch.equal(state.branches[1].pooled, sd3.condition_prompts([prompt]).pooled)  # pooled unchanged
    assert all(g.use_safe(i, state) == [True] for i in range(4))  # no filter on SD3: every step


def test_safree_fixed_mode_on_sd3_projects_each_encoder_in_its_own_space(sd3):
    from unlearn_exp.guidance.safree import sd3_fixed_projection

    prompt = "a photo of a nude woman on a beach"
    text_e = sd3.condition_prompts([prompt]).sequence[0]
    safe, changed = sd3_fixed_projection(sd3, prompt, text_e, SAFREE_KEYWORDS, alpha=0.01)
    untouched = [i for i in range(text_e.shape[0]) if i not in changed]
    assert torch.equal(safe[untouched], text_e[untouched].float())
    t5 = [i for i in changed if i >= 77]
    assert changed and all(not torch.equal(safe[i], text_e[i]) for i in changed)
    n_words = len(sd3.tokenizer_3(prompt).input_ids) - 1  # T5 pieces before EOS
    assert all(i - 77 < n_words for i in t5)  # only the prompt's own T5 words, never EOS or padding


def test_safree_official_on_sd3_needs_t5_and_neither_mode_re_attention(sd3_no_t5, sd3):
    from unlearn_exp.guidance.safree import SAFREE

    official = dataclasses.replace(typed_preset(SAFREEConfig, "safree"), compat="official")
    with pytest.raises(UserError, match="model.t5=true"):
        SAFREE(SAFREE_KEYWORDS, "x", official).prepare(
            sd3_no_t5, ["a"], sd3_no_t5.tokenize(["a"]), None, 7.0, 3
        )
    fixed = dataclasses.replace(official, compat="fixed")  # the CLIP encoders find their own flags
    prompt = ["a photo of a nude woman"]
    state = SAFREE(SAFREE_KEYWORDS, "x", fixed).prepare(
        sd3_no_t5, prompt, sd3_no_t5.tokenize(prompt), None, 7.0, 3
    )
    assert state.meta[0]["safree_compat_differs"] is None and state.extra["safe_e"].shape[1] == 77 + 256
    settings = dataclasses.replace(typed_preset(SAFREEConfig, "safree"), lra="paper")
    with pytest.raises(UserError, match="not on SD3"):
        SAFREE(SAFREE_KEYWORDS, "x", settings).prepare(sd3, ["a"], sd3.tokenize(["a"]), None, 7.0, 3)


# ---- concept inversion on SD3: one learned row per token in each text encoder
def test_inversion_on_sd3_writes_rows_per_encoder_and_they_load_back(tmp_path):
    from safetensors import safe_open

    from unlearn_exp.inversion.concept_inversion import invert
    from unlearn_exp.inversion.textual_inversion import load_concept_tokens

    cfg = compose(
        ["model=tiny_sd3", "inversion.steps=3", "inversion.batch_size=2", "inversion.num_vectors=2"],
        hydra=False,
    )
    comps = build_tiny_sd3(seed=0, resolution=16)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    invert(comps, images, cfg.inversion, tmp_path / "inv", progress=False)
    f = tmp_path / "inv" / "learned_embeds.safetensors"
    with safe_open(str(f), framework="pt") as st:
        shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    assert shapes == {"clip_l": (2, 16), "clip_g": (2, 16), "t5": (2, 32)}  # SDXL's keys, and T5
    prompt = ["a photo of <c*> <c*>_1"]
    fresh = build_tiny_sd3(seed=0, resolution=16)
    assert load_concept_tokens(fresh, f) == ["<c*>", "<c*>_1"]
    a, b = fresh.condition_prompts(prompt), comps.condition_prompts(prompt)
    assert torch.equal(a.sequence, b.sequence) and torch.equal(a.pooled, b.pooled)
    before = build_tiny_sd3(seed=0, resolution=16)
    load_concept_tokens(before, f)
    untouched = build_tiny_sd3(seed=0, resolution=16)
    # only the placeholder rows are new: every other row of every table is the original's
    for (_, _, enc), (_, _, ref) in zip(before.text_encoder_slots(), untouched.text_encoder_slots()):
        n = ref.get_input_embeddings().weight.shape[0]
        assert torch.equal(enc.get_input_embeddings().weight[:n], ref.get_input_embeddings().weight)
    with pytest.raises(UserError, match="learned on another model"):
        load_concept_tokens(build_tiny_sd3(seed=0, resolution=16, t5=False), f)  # no T5 to take its rows


@pytest.mark.slow
def test_the_nudity_duo_sd3_grid_runs_end_to_end_at_tiny_scale(tmp_path):
    """Every cell of ``+experiment=nudity_duo_sd3`` (4 betas x none/SLD/SAFREE x explicit/inverted/shared)
    on tiny SD3 components: DUO trained per beta, C* inverted per beta and shared from beta 500."""
    from unlearn_exp import config
    from unlearn_exp.cell import run_cell
    from unlearn_exp.evaluation import read_table

    base = ["+experiment=nudity_duo_sd3"]
    tiny = ["model=tiny_sd3", *_cell_inputs(tmp_path, ["a nude woman", "a red car"]), *SMOKE_DUO]
    tiny += ["inversion.steps=2", "inversion.image_set.n_images=2"]
    cells = config.grid(base)
    assert len(cells) == 28
    seen = set()
    for cell in cells:
        out = run_cell(compose([*base, *cell, *tiny], hydra=False))
        row = read_table(Path(out["results"]) / "cells.parquet").iloc[0]
        assert row.n_images == 2 and 0 <= row.dsr <= 1 and row.scale == "tiny_sd3"
        seen.add((int(row.beta), row.guidance, row.embedding))
    assert len(seen) == 28
    assert len(list(tmp_path.rglob("pytorch_lora_weights.safetensors"))) == 4  # one DUO per beta


@pytest.mark.slow
def test_sd3_methods_grid_cells_run_at_tiny_scale(tmp_path):
    """The SD3 methods grid's own methods on tiny SD3 components: ESD-x under SLD and UCE under SAFREE,
    each with C* inverted on its checkpoint; every cell of both grids composes and passes validation."""
    from unlearn_exp import config
    from unlearn_exp.cell import run_cell
    from unlearn_exp.evaluation import read_table

    for exp in ("nudity_methods_sd3", "violence_methods_sd3"):
        cells = config.grid([f"+experiment={exp}"])
        assert len(cells) == 35
        for cell in cells:
            validate(compose([f"+experiment={exp}", *cell, "model=tiny_sd3"], hydra=False))
    tiny = ["model=tiny_sd3", *_cell_inputs(tmp_path, ["a nude woman", "a red car"]), "+debug=default"]
    tiny += [
        "debug.train_steps=1",
        "debug.sample_steps=2",
        "inversion.steps=2",
        "inversion.image_set.n_images=2",
        "inversion.image_set.check=false",  # random weights draw nothing for the nudity filter to keep
    ]
    for cell in (["checkpoint=esd_x", "guidance=sld"], ["checkpoint=uce", "guidance=safree"]):
        cfg = compose(["+experiment=nudity_methods_sd3", *cell, "embedding=inverted", *tiny], hydra=False)
        row = read_table(Path(run_cell(cfg)["results"]) / "cells.parquet").iloc[0]
        assert row.scale == "tiny_sd3" and row.n_images == 2 and 0 <= row.dsr <= 1
        assert row.checkpoint_method == cell[0].split("=")[1].split("_")[0] and row.embedding == "inverted"


def test_the_planner_counts_sd3_rows_and_memory_from_its_sizes():
    """Without weights: SD3-medium's published sizes (2.03B transformer, 4.76B T5...), transformer rows
    through the guidance's branches, DUO's training at its 512 px; T5 off drops its weights."""
    from unlearn_exp import plan
    from unlearn_exp.models import memory

    cfg = compose(["+experiment=nudity_duo_sd3", "guidance=sld"], hydra=False)
    sizes = memory.model_sizes(cfg.model)
    assert sizes.family == "sd3" and sizes.layers == 24 and sizes.inner == 1536 and sizes.latent == (16, 128)
    assert round(sizes.params["transformer"] / 1e9, 2) == 2.03
    assert round(sizes.params["text_encoder_3"] / 1e9, 2) == 4.76
    stages = memory.cell_stages(cfg, sizes, branches=3, n_pairs=64)
    weights_gib = stages["sampling"].weights / memory.GIB
    assert 14 < weights_gib < 15  # about 7.7B parameters in float16
    duo_512 = stages["duo"].activations
    at_1024 = memory.cell_stages(
        compose(["+experiment=nudity_duo_sd3", "checkpoint.train_resolution=1024"], hydra=False), sizes, 3, 64
    )["duo"].activations
    assert at_1024 > 3 * duo_512  # DUO's recipe trains at 512 px, not the model's 1024
    no_t5 = memory.model_sizes(compose(["model=sd3", "model.t5=false"], hydra=False).model)
    assert "text_encoder_3" not in no_t5.params
    over = ["model=tiny_sd3", "guidance=sld"]
    text = plan.render([plan.plan_cell(compose(over, hydra=False), over, set())], None, None)
    assert "transformer rows" in text and "UNet rows" not in text


def test_the_sd3_experiments_compose_and_stop_in_one_line_without_weights(tmp_path):
    import pandas as pd_

    from unlearn_exp import report
    from unlearn_exp.report.reproduce import check_weights

    experiments = ("nudity_duo_sd3", "violence_duo_sd3", "nudity_duo_sd3_transfer")
    for exp in (*experiments, "nudity_methods_sd3", "violence_methods_sd3"):
        cfg = compose([f"+experiment={exp}", f"model.path={tmp_path / 'absent'}"], hydra=False)
        validate(cfg)  # every cell's methods run on SD3
        assert cfg.model.family == "sd3" and cfg.checkpoint.target_modules[0] == "to_q"
        assert cfg.sampling.scheduler == "flow_euler" and cfg.sampling.steps == 28
        with pytest.raises(UserError, match="no weights for model 'sd3'") as e:
            check_weights(cfg.model)
        assert "\n" not in str(e.value) and "absent" in str(e.value)
    # make reproduce-table MODEL=sd3: the cells it would run, the nudity grid's first
    missing = report.missing_cells(pd_.DataFrame(), "sd3")
    assert len(missing) == len(report.missing_cells(pd_.DataFrame(), "sd14"))  # the same table positions
    assert {m[0] for m in missing} == {f"+experiment={e}" for e in experiments}
    assert missing[0][0] == "+experiment=nudity_duo_sd3"  # nudity first


@pytest.mark.slow
def test_an_sd3_folder_runs_a_duo_cell_and_exports_a_pipeline_diffusers_loads(tmp_path):
    """model=sd3 on a diffusers folder (not the in-memory tiny model): the cell's weight check reads the
    SD3 layout, DUO trains, and ``artifacts export`` writes an SD3 pipeline folder with the LoRA fused."""
    from diffusers import StableDiffusion3Pipeline

    from unlearn_exp import artifacts
    from unlearn_exp.cell import run_cell

    folder = save_components(build_tiny_sd3(seed=0), tmp_path / "sd3")
    inputs = _cell_inputs(tmp_path, ["a nude woman", "a red car"])
    over = ["model=sd3", f"model.path={folder}", "model.resolution=32", "checkpoint=duo_sd3", "guidance=none"]
    over += [*inputs, *SMOKE_DUO]
    run_cell(compose(over, hydra=False))
    (manifest,) = [p for p in tmp_path.rglob("manifest.json") if "unlearning/duo" in p.as_posix()]
    out = artifacts.export(manifest.parent, tmp_path / "exported", over)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    fused = load_model(compose(over, hydra=False).model)
    assert not torch.equal(
        pipe.transformer.transformer_blocks[0].attn.to_q.weight,
        fused.transformer.transformer_blocks[0].attn.to_q.weight,
    )
    assert "transformer: DUO LoRA fused (Nudity)" in (out / "export.md").read_text()


def test_unlearndiffatk_on_sd3_searches_through_clip_l_and_gives_every_encoder_the_words():
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings, MirroredRows, UnlearnDiffAtk, run_attack
    from unlearn_exp.config import preset

    comps = build_tiny_sd3(seed=0)
    plain = [enc.get_input_embeddings() for _, _, enc in comps.text_encoder_slots()]
    settings = AttackSettings.from_cfg(
        preset("attack", "unlearndiffatk", k=2, steps=3, seed=0), guidance_scale=7.0, num_steps=10
    )
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    module = UnlearnDiffAtk(comps, target, "a person", settings)
    assert isinstance(comps.text_encoder_2.get_input_embeddings(), MirroredRows)
    module.loss_at(0).backward()
    assert module.rows.learned.grad is not None and module.rows.learned.grad.abs().sum() > 0
    tokens = module.tokens_for([module.adversarial_prompt()])
    words_t5 = comps.tokenize([f"{module.words()} a person"]).more["t5"]
    assert torch.equal(tokens.more["t5"], words_t5)  # T5 reads the projected words, not placeholders
    module.restore()
    assert [enc.get_input_embeddings() for _, _, enc in comps.text_encoder_slots()] == plain
    out = run_attack(comps, target, "a person", settings)
    assert len(out["losses"]) == 3 and out["prompt"].endswith("a person")
    assert [enc.get_input_embeddings() for _, _, enc in comps.text_encoder_slots()] == plain


def test_esd_on_sd3_trains_the_text_streams_attention_for_esd_x(tmp_path):
    from unlearn_exp.config import preset
    from unlearn_exp.unlearning.esd import SD3_RULES, esd_parameter_names, train_esd

    comps = build_tiny_sd3(seed=0, t5=False)
    before = {k: v.clone() for k, v in comps.transformer.state_dict().items()}
    hp = preset("checkpoint", "esd", variant="esd-x", steps=2, ddim_steps=3, lr=1e-2, checkpoint_every=100)
    hp["precision"] = "32-true"
    train_esd(comps, "nudity", hp, work_dir=tmp_path / "w", out_dir=tmp_path / "o")
    changed = [k for k, v in comps.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(SD3_RULES["esd-x"](k) for k in changed)
    assert all(".attn.add_" in k or ".attn.to_add_out." in k for k in changed)
    u = esd_parameter_names(comps.transformer, "esd-u", "sd3")
    assert u and not set(u) & set(esd_parameter_names(comps.transformer, "esd-x", "sd3"))
    assert not any(n.startswith(("time_text_embed", "context_embedder", "proj_out")) for n in u)
