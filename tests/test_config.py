"""The Hydra app: every experiment composes, sweeps start with --multirun or the bare word multirun,
bad overrides fail with Hydra's own message, unbuilt stages fail with one line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, compose, run_app

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.slow
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for group in ("model", "task", "checkpoint", "guidance", "embedding", "benchmark", "judge", "sampling"):
        assert group in cfg, group
    assert cfg.name == experiment


def test_nudity_duo_sweeps_the_grid():
    cfg = compose(["+experiment=nudity_duo"])
    params = cfg.hydra.sweeper.params
    assert params["checkpoint.beta"] == "250,500,1000,2000"
    assert params["guidance"] == "none,sld,safree"
    assert params["embedding"] == "explicit,inverted,shared"
    assert cfg.model.name == "sd14" and cfg.checkpoint.method == "duo" and cfg.judge.name == "nudenet_duo"


def test_debug_shrinks_an_experiment():
    cfg = compose(["+experiment=nudity_duo", "+debug=default"])
    assert cfg.benchmark.limit == 4 and cfg.sampling.steps == 5


@pytest.mark.parametrize(
    "experiment", ["nudity_duo", "violence_duo", "nudity_duo_transfer", "toy_duo", "nudity_methods"]
)
def test_debug_shrinks_every_stage_and_nothing_without_it(experiment):
    """+debug=default used to shrink prompts and sampling only: DUO trained at full size (4 x 1000
    steps on 64 pairs sampled at 50 steps) and C* learned from 64 images. Every training stage is
    now small, and without +debug every value is the published one."""
    from unlearn_exp.hashing import to_plain

    def sizes(cfg, option):
        ck = (
            to_plain(compose([*base, f"checkpoint={option}"]).checkpoint)
            if option
            else to_plain(cfg.checkpoint)
        )
        task = to_plain(cfg.task)
        recipe = task.get("duo_recipe") or (ck.get("recipes") or {}).get(task["name"]) or {}
        adapters = recipe.get("adapters") or []
        return {
            "duo_steps": {a["steps"] for a in adapters},
            "n_pairs": {a["n_pairs"] for a in adapters},
            "pair_steps": (ck.get("pair_sampling") or {}).get("steps"),
            "esd": (ck.get("steps"), ck.get("ddim_steps")) if ck.get("method") == "esd" else None,
        }

    base = [f"+experiment={experiment}", "+debug=default"]
    small = compose(base)
    assert small.inversion.steps <= 20 and small.inversion.image_set.n_images <= 4
    assert small.attack.steps <= 3 and small.attack.n_targets <= 2
    got = sizes(small, "duo" if experiment.endswith("methods") else None)
    assert max(got["duo_steps"]) <= 20 and max(got["n_pairs"]) <= 4 and got["pair_steps"] <= 10
    assert sizes(small, "esd")["esd"] == (20, 10)
    full = compose([f"+experiment={experiment}"])
    assert "debug" not in full and full.inversion.steps == 3000
    base = [f"+experiment={experiment}"]
    full_sizes = sizes(full, "duo" if experiment.endswith("methods") else None)
    assert min(full_sizes["duo_steps"]) >= 500 and min(full_sizes["n_pairs"]) >= 32
    assert sizes(full, "esd")["esd"] == (1000, 50)


@pytest.mark.parametrize("word", ["multirun", "--multirun"])
@pytest.mark.slow
def test_multirun_word_starts_the_sweep(tmp_path, word):
    proc = run_app(
        "+experiment=nudity_duo",
        "stage=compose",
        word,
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 4 * 3 * 3, jobs
    assert "checkpoint.beta=2000" in (tmp_path / "sweep" / "35" / ".hydra" / "overrides.yaml").read_text()


def test_default_sweep_dir_is_multirun(tmp_path):
    cfg = compose(["+experiment=nudity_duo"])
    assert "/multirun/" in cfg.hydra.sweep.dir


@pytest.mark.parametrize(
    "override,expected",
    [
        ("guidance=bogus", "error: unknown guidance 'bogus': choose one of none, safree, sld"),
        ("no_such_key=1", "error: unknown config key no_such_key: no code reads it"),
    ],
)
def test_unknown_override_fails_with_hydra_message(override, expected):
    proc = run_app(override, "stage=compose")
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "unlearn_exp/" not in proc.stderr  # no traceback from our code


@pytest.mark.slow
def test_a_checkpoint_without_its_file_fails_with_one_line():
    proc = run_app("model=tiny", "checkpoint=unet_folder", "hydra/job_logging=disabled")  # files only
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert (
        lines[-1].startswith("error: ")
        and "checkpoint=unet_folder loads a diffusers UNet folder" in lines[-1]
        and "set checkpoint.path" in lines[-1]
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_help_says_what_the_app_does_with_examples():
    proc = run_app("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("unlearn_exp: concept unlearning")
    assert proc.stdout.count("python -m unlearn_exp") >= 5 and "== Configuration groups ==" in proc.stdout
    assert "huggingface-cli" not in proc.stdout  # the pinned huggingface_hub 2.x CLI is `hf`


def test_no_arguments_runs_the_embedded_toy_default(capsys):
    from unlearn_exp.__main__ import EMBEDDED_DEFAULT, _default_argv

    assert _default_argv(["guidance=sld"]) == ["guidance=sld"]
    assert _default_argv([]) == EMBEDDED_DEFAULT
    assert "no arguments: running one toy-world cell" in capsys.readouterr().err
    cfg = compose(EMBEDDED_DEFAULT, hydra=True)
    # everything it needs ships with the project: no weights, prompt file or LPIPS trunk to fetch
    assert (cfg.model.name, cfg.benchmark.loader, cfg.judge.type, cfg.pp.metric.name) == (
        "toy",
        "toy",
        "toy",
        "toy_features",
    )
    assert cfg.hydra.job.name == "unlearn_exp"


SCHEMA_GROUPS = (
    "guidance",
    "sampling",
    "checkpoint",
    "inversion",
    "model",
    "embedding",
    "judge",
    "pp",
    "attack",
)


@pytest.mark.slow
def test_structured_configs_refuse_unknown_keys_and_wrong_types():
    """Every YAML of a group with structured configs extends its schema (unlearn_exp/schema.py): the
    YAML holds the values, the schema the keys and types, and the code reads keys without defaults."""
    import yaml
    from hydra.errors import ConfigCompositionException

    from unlearn_exp.schema import SCHEMAS

    used = set()
    for group in SCHEMA_GROUPS:
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            defaults = yaml.safe_load(path.read_text()).get("defaults") or []
            names = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
            base = [d for d in defaults if isinstance(d, str) and (path.parent / f"{d}.yaml").is_file()]
            while base:  # a YAML that extends another of its group (duo_toy: duo) takes that one's schema
                defaults = yaml.safe_load((path.parent / f"{base[0]}.yaml").read_text())["defaults"]
                names = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
                base = [d for d in defaults if isinstance(d, str) and (path.parent / f"{d}.yaml").is_file()]
            assert len(names) == 1, f"{path} names no schema"
            node = SCHEMAS[(group, names[0])]
            used.add((group, names[0]))
            cfg = compose([f"{group}={path.stem}"], hydra=False)
            assert set(cfg[group]) == set(node.__dataclass_fields__), path  # every key, none missing or extra
    assert used == set(SCHEMAS)  # no schema without a YAML
    for bad in (
        ["guidance=sld", "guidance.bogus=1"],
        ["guidance=safree", "guidance.up_t=abc"],
        ["checkpoint=duo", "checkpoint.rank=abc"],
        ["checkpoint=esd", "checkpoint.bogus=1"],
        ["inversion.image_set.check=maybe"],
        ["model=toy", "model.seed=1"],
        ["judge=nudenet_duo", "judge.classes=3"],
        ["pp.bench=sometimes"],
    ):
        with pytest.raises(ConfigCompositionException):
            compose(bad, hydra=False)
    assert (
        compose(["guidance=safree", "guidance.alpha=1"], hydra=False).guidance.alpha == 1
    )  # kept as written


@pytest.mark.slow
def test_compose_cache_gives_the_composed_config_and_follows_conf_changes(tmp_path, monkeypatch):
    """config.compose keeps a composed config on disk under the hash of its overrides and of conf/:
    reading it back gives the same config (interpolations as written), a change under conf/ or a
    damaged file composes afresh."""
    import shutil

    from omegaconf.errors import ConfigAttributeError

    from unlearn_exp import config

    monkeypatch.setenv("UNLEARN_EXP_COMPOSE_CACHE", str(tmp_path / "cache"))
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    monkeypatch.setattr(config, "CONF_DIR", conf)
    overrides = ["+experiment=toy_duo", "checkpoint.beta=2000", "guidance=sld", "embedding=inverted"]
    first = config.compose(overrides)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    again = config.compose(overrides)  # read back
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(first)
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(first, resolve=True)
    assert "${" in OmegaConf.to_yaml(again)  # interpolations kept, resolved when read
    with pytest.raises(ConfigAttributeError):
        _ = again.no_such_key  # struct mode, as a composed config
    # a changed YAML under conf/ is a new key
    duo = conf / "checkpoint" / "duo.yaml"
    duo.write_text(duo.read_text().replace("rank: 32", "rank: 8"))
    assert config.compose(overrides).checkpoint.rank == 8
    # a damaged cache file is composed afresh
    for f in (tmp_path / "cache").glob("*.json"):
        f.write_text("{not json")
    config._READ.clear()  # as a new process would
    assert config.compose(overrides).checkpoint.rank == 8
    monkeypatch.setenv("UNLEARN_EXP_COMPOSE_CACHE", "off")
    assert config.compose(overrides).checkpoint.rank == 8


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_a_config_read_back_from_the_compose_cache_has_the_same_identity(experiment, tmp_path, monkeypatch):
    """The compose cache stores configs as JSON; what it gives back must hash as the fresh config does
    (a mapping with numeric keys once came back with string keys, another spec key)."""
    from unlearn_exp import config
    from unlearn_exp.identity import cell_spec, config_hash

    monkeypatch.setenv("UNLEARN_EXP_COMPOSE_CACHE", str(tmp_path / "cache"))
    overrides = [f"+experiment={experiment}", "guidance=sld", "embedding=inverted"]
    fresh = config.compose(overrides)
    config._READ.clear()
    again = config.compose(overrides)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(fresh)
    assert config_hash(cell_spec(again)) == config_hash(cell_spec(fresh))


def test_hydra_sweep_functions_pass_the_precheck_and_enumerate_as_the_launcher_does():
    """``checkpoint.beta=range(250,1001,250)`` in a multirun was refused by the pre-Hydra check."""
    from unlearn_exp.config import grid, precheck, sweep_values

    precheck(["+experiment=toy_duo", "checkpoint.beta=range(250,1001,250)", "--multirun"])
    precheck(["+experiment=toy_duo", "guidance=choice(sld,safree)", "--multirun"])
    precheck(["+experiment=toy_duo", "sampling.guidance_scale=interval(2,3)", "--multirun"])  # Hydra's to say
    assert sweep_values("checkpoint.beta=range(250,1001,250)") == ["250", "500", "750", "1000"]
    assert sweep_values("name=${oc.env:CUDA_VISIBLE_DEVICES,}") is None  # a comma inside an interpolation
    cells = grid(
        ["+experiment=toy_duo", "checkpoint.beta=range(250,1001,250)", "guidance=choice(sld,safree)"]
    )
    assert len(cells) == 4 * 2 * 3 and {c[0] for c in cells} == {
        f"checkpoint.beta={b}" for b in (250, 500, 750, 1000)
    }


def test_debug_before_the_experiment_still_shrinks_the_sampler():
    from unlearn_exp.config import compose as app_compose

    first = app_compose(["+debug=default", "+experiment=toy_duo"])
    assert first.sampling.steps == 5 and first.sampling.batch_size == 2
    assert first.checkpoint.steps is None and first.task.duo_recipe.adapters[0].steps == 20
