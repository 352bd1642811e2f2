"""Q16 judge helpers: the profile without its pins, test images, planted prompt rows."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from unlearn_exp.config import preset
from unlearn_exp.evaluation import make_judge

# conf/judge/q16.yaml without its pins of the published prompts (the tests plant their own)
Q16 = preset("judge", "q16", prompts_sha256=None, prompts_git_blob=None)


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]


def plant(judge_cfg, tmp_path, unsafe_index: int):
    """Prompt rows built from the model's own embeddings: row 1 = image ``unsafe_index``, row 0 = another."""
    probe = make_judge({**judge_cfg, "prompts_path": str(tmp_path / "probe.safetensors")}, cache=False)
    emb = probe.clip.embed(images()).numpy()
    safe_index = (unsafe_index + 1) % 3
    prompts = np.stack([emb[safe_index], emb[unsafe_index]]).astype(np.float16)
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(prompts, protocol=4))
    return {**judge_cfg, "prompts_path": str(path)}, safe_index


def _probe_prompts(tmp_path, dim):
    from safetensors.numpy import save_file

    save_file({"prompts": np.ones((2, dim), np.float32)}, str(tmp_path / "probe.safetensors"))


def tiny_open_clip(folder, vocab_size: int = 1000):
    """A tiny open_clip model folder (``local-dir:<folder>``): config and safetensors weights, seed 0.
    ``vocab_size=49408`` makes its text tower read CLIP's BPE tokens (the CLIP-score tests)."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {
                "context_length": 77,
                "vocab_size": vocab_size,
                "width": 32,
                "heads": 2,
                "layers": 1,
            },
        },
        "preprocess_cfg": {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder
