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
