"""Peak GPU memory of a cell's stages, estimated from the model's sizes (for ``python -m unlearn_exp.plan``).

SD3 (docs/model_families.md 5) is estimated the same way with its own sizes and its MMDiT's constants.

Nothing is loaded and nothing runs. The parameters are counted from the model folder's parts
(``unet/``, ``text_encoder/``, ``vae/``): the tensor shapes in each part's safetensors header (no
tensor data is read), or, for a part with a ``config.json`` and no safetensors file, its class built
from that config on PyTorch's ``meta`` device. Without the folder (weights absent), the named model's
published configuration gives them (SD v1.4: UNet 859.5M, text encoder 123.1M, VAE 83.7M parameters:
"from the published sizes"); the ``tiny`` model is built on the ``meta`` device.

A stage's peak is its weights (parameters x the bytes of the dtype they run in; ``auto`` as on a GPU:
float16, training in 16-mixed), what it holds besides (the optimiser's state of the trained
parameters, 16 bytes each: float32 weight, gradient and AdamW's two moments; DUO's pair images; the
inversion's image set) and its activations, from one formula: ``(per x rows + fixed) x feature
elements x bytes per element`` (``ACTIVATION``). The UNet's feature elements are the sum over its
resolution levels of channels x latent height x latent width (2.38M per row for SD v1.4 at 512 px);
the VAE's likewise at pixel resolution (60.8M per image). The constants were measured once on SD
v1.4's configuration (random weights, float32, PyTorch 2.14 on the CPU, whose fused attention keeps
no attention matrix, as on a GPU) as the peak resident memory above the weights during one pass: at
1 and 2 rows (the UNet at 256 px for the slope, 512 px for the fixed part; the VAE at 512 px). Mixed
precision's training activations take ``MIXED_SHARE`` of float32's (measured with bfloat16 autocast:
normalisation layers keep float32). For SD v1.4 in float16 this gives about 0.09 GiB per UNet row
without gradients, 0.99 GiB per row forward and backward, 0.38 GiB per decoded image: sampling at
batch 4 with classifier-free guidance peaks near 3.7 GiB (the weights 2.0 GiB, then the decoding),
in line with the 3-4 GiB usually seen for float16 inference. It is an estimate: CUDA's kernels,
cuDNN's workspaces and the caching allocator differ from the CPU's, so check a stage on the device
(``torch.cuda.max_memory_allocated``); the fit check keeps ``CUDA_RESERVE_GIB`` of the card for the
CUDA context and the allocator's fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from unlearn_exp.families import family_of
from unlearn_exp.hashing import to_plain
from unlearn_exp.identity import model_folder, resolved_precision
from unlearn_exp.models.published_configs import SD3_MEDIUM

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_RESERVE_GIB = 1.0  # CUDA context (~0.5 GiB), cuDNN workspaces, allocator fragmentation
MIXED_SHARE = 0.55  # 16-mixed training activations / float32's (bfloat16 autocast on the CPU: 0.54)

# (per row or image, fixed) activation elements per feature element, measured as described above.
# float32 peaks above the weights, SD v1.4: the UNet without gradients 0.27 / 0.44 GiB at 1 / 2 rows
# (512 px); forward and backward (gradient to the input, or to LoRA) 0.66 / 1.11 GiB (256 px) and
# 2.31 GiB at 1 row (512 px, LoRA rank 32); the VAE decoding 1.04 GiB for 1 image (512 px) and
# 0.36 / 0.55 GiB for 1 / 2 (256 px); its encoding 0.65 / 1.28 GiB for 1 / 2 (512 px)
ACTIVATION = {
    "unet_infer": (20.0, 10.0),  # one forward pass without gradients, per UNet row
    "unet_train": (203.0, 58.0),  # forward and backward, gradients to the input (LoRA, embedding)
    "vae_decode": (3.4, 1.2),  # per image, without gradients
    "vae_encode": (2.75, 0.15),
    # SD3's MMDiT, per feature element (tokens x inner width; in training x layers, whose activations
    # are all kept). Measured 2026-12-07 as above on SD3-medium's blocks (float32, PyTorch 2.14, CPU):
    # without gradients 0.170 / 0.290 GiB at 1 / 2 rows (512 px, 2 or 4 blocks alike: a block's
    # activations are freed before the next) and 0.449 GiB at 1 row (1024 px); the fixed part chosen
    # to fit 1024 px (the default; 512 px is overestimated by about 15%). Forward and backward to the
    # text input: 0.361 / 0.622 GiB at 2 / 4 blocks (1 row), 0.642 GiB at 2 blocks and 2 rows (512 px)
    "mmdit_infer": (15.5, 3.0),
    "mmdit_train": (19.4, 0.5),
}

# Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4): its published parameter counts, and the
# parts' configs (their diffusers config.json files, the keys that differ from the classes' defaults)
PUBLISHED_PARAMS = {"sd14": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}}
PUBLISHED_CONFIGS = {
    "sd14": {
        "unet": {"cross_attention_dim": 768, "sample_size": 64},
        "text_encoder": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "vae": {
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 4,
            "layers_per_block": 2,
            "sample_size": 512,
        },
    }
}
PUBLISHED_CONFIGS["sd3"] = SD3_MEDIUM
PARTS = ("unet", "text_encoder", "vae")
SD3_PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
SD3_TEXT = {"sampling": 77 + 256, "duo": 77 + 77}  # text tokens of a row: CLIP's 77 and T5's
STAGES = (
    "pairs",
    "duo",
    "esd",
    "image_set",
    "inversion",
    "sampling",
    "judging",
)  # in the order a cell runs them


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs of a model: parameter counts, its UNet's linear layers (for LoRA),
    the UNet's and VAE's channels per level, the latent and the pixel resolution."""

    params: dict[str, int]
    linears: dict[str, tuple[int, int]]  # UNet module name -> (out, in) features
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]  # () without a VAE
    latent: tuple[int, int]  # (channels, side)
    resolution: int
    source: str
    # SD3's MMDiT (family sd3): its patch size, inner width and number of joint blocks
    family: str = "sd1"
    patch: int = 1
    inner: int = 0
    layers: int = 0
    denoiser_params: dict[str, int] = field(default_factory=dict)  # parameter name -> elements (ESD)

    def kind(self, passes: str) -> str:
        """The ``ACTIVATION`` entry of the denoiser's ``infer`` or ``train`` pass."""
        return f"{'mmdit' if self.family == 'sd3' else 'unet'}_{passes}"

    def denoiser_elements(self, train: bool = False, text_tokens: int = SD3_TEXT["sampling"]) -> int:
        """The denoiser's feature elements per row: the UNet's, or the MMDiT's tokens (image patches and
        text) x its width, x its blocks in training (each block's activations are kept)."""
        if self.family != "sd3":
            return self.unet_elements()
        tokens = (self.latent[1] // self.patch) ** 2 + text_tokens
        return tokens * self.inner * (self.layers if train else 1)

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """Trainable parameters of LoRA at ``rank`` on the linear layers ``targets`` names (peft's
        suffix match): ``rank x (in + out)`` per layer."""
        return sum(
            rank * (i + o)
            for name, (o, i) in self.linears.items()
            if any(name == t or name.endswith("." + t) for t in targets)
        )

    def unet_elements(self) -> int:
        side = self.latent[1]
        return sum(c * math.ceil(side / 2**i) ** 2 for i, c in enumerate(self.unet_channels))

    def vae_elements(self) -> int:
        return sum(c * math.ceil(self.resolution / 2**i) ** 2 for i, c in enumerate(self.vae_channels))


def activation_bytes(kind: str, elements: int, count: int, element_bytes: float) -> float:
    """``ACTIVATION[kind]`` for ``count`` rows (or images) of a model with ``elements`` feature elements."""
    if count <= 0 or elements <= 0:
        return 0.0
    per, fixed = ACTIVATION[kind]
    return (per * count + fixed) * elements * element_bytes


# ----------------------------------------------------------------------------- counting parameters
def _meta_module(part: str, config: dict[str, Any], projection: bool = False):
    """The part's class built from ``config`` on PyTorch's ``meta`` device (shapes only, no memory);
    ``projection``: CLIP with its text projection (SD3's text encoders)."""
    import torch

    with torch.device("meta"):
        if part == "text_encoder_3":
            from transformers import T5Config, T5EncoderModel

            return T5EncoderModel(T5Config.from_dict(config))
        if part.startswith("text_encoder"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            projection = projection or config.get("architectures") == ["CLIPTextModelWithProjection"]
            return (CLIPTextModelWithProjection if projection else CLIPTextModel)(
                CLIPTextConfig.from_dict(config)
            )
        from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

        cls = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel}.get(part, AutoencoderKL)
        return cls.from_config(config)


def _module_shapes(module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from safetensors headers: the header is read, no tensor data."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors weights of one part, without half-precision variants where a full file exists."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]
    return plain or files[:1]


def _part_shapes(folder: Path, part: str) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]] | None:
    sub = folder / part
    config_file = sub / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    files = _weight_files(sub) if sub.is_dir() else []
    if files:
        return _header_shapes(files), config or {}
    if config is not None:
        return _module_shapes(_meta_module(part, config)), config
    return None


def _linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    return {
        n.removesuffix(".weight"): (s[0], s[1])
        for n, s in shapes.items()
        if n.endswith(".weight") and len(s) == 2
    }


def _sizes(parts: dict[str, tuple[dict, dict]], resolution: int, source: str) -> ModelSizes:
    unet_shapes, unet_cfg = parts["unet"]
    vae = parts.get("vae")
    vae_channels = tuple(int(c) for c in (vae[1].get("block_out_channels") or ())) if vae else ()
    factor = 2 ** (len(vae_channels) - 1) if vae_channels else 1
    in_channels = int(unet_cfg.get("in_channels", 4))
    return ModelSizes(
        params={p: sum(math.prod(s) for s in shapes.values()) for p, (shapes, _) in parts.items()},
        linears=_linears(unet_shapes),
        denoiser_params={n: math.prod(s) for n, s in unet_shapes.items()},
        unet_channels=tuple(int(c) for c in unet_cfg.get("block_out_channels", (320, 640, 1280, 1280))),
        vae_channels=vae_channels,
        latent=(in_channels, resolution // factor),
        resolution=resolution,
        source=source,
    )


def _sd3_sizes(parts: dict[str, tuple[dict, dict]], resolution: int, source: str) -> ModelSizes:
    shapes, cfg = parts["transformer"]
    vae = parts.get("vae")
    vae_channels = tuple(int(c) for c in (vae[1].get("block_out_channels") or ())) if vae else ()
    factor = 2 ** (len(vae_channels) - 1) if vae_channels else 1
    return ModelSizes(
        params={p: sum(math.prod(s) for s in sh.values()) for p, (sh, _) in parts.items()},
        linears=_linears(shapes),
        denoiser_params={n: math.prod(s) for n, s in shapes.items()},
        unet_channels=(),
        vae_channels=vae_channels,
        latent=(int(cfg.get("in_channels", 16)), resolution // factor),
        resolution=resolution,
        source=source,
        family="sd3",
        patch=int(cfg.get("patch_size", 2)),
        inner=int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 64)),
        layers=int(cfg.get("num_layers", 24)),
    )


def _sd3_model_sizes(model_cfg) -> ModelSizes | None:
    """SD3's sizes: the tiny model on the meta device, a folder's headers, or SD3-medium's configs."""
    import torch

    resolution = int(model_cfg.get("resolution", 1024))
    wanted = [p for p in SD3_PARTS if p != "text_encoder_3" or bool(model_cfg.get("t5", True))]
    if model_cfg.get("source") == "tiny":
        from unlearn_exp.models.sd3 import build_tiny_sd3

        with torch.device("meta"):
            comps = build_tiny_sd3(seed=0, resolution=resolution, t5=bool(model_cfg.get("t5", True)))
        parts = {
            p: (_module_shapes(m), dict(m.config) if p in ("transformer", "vae") else {})
            for p, m in comps.modules().items()
        }
        return _sd3_sizes(parts, resolution, "the tiny SD3 model, built on the meta device")
    folder = model_folder(model_cfg)
    if folder is not None:
        parts = {p: found for p in wanted if (found := _part_shapes(folder, p)) is not None}
        if "transformer" in parts:
            return _sd3_sizes(parts, resolution, f"counted from {folder}")
    configs = {p: SD3_MEDIUM[p] for p in wanted}
    parts = {p: (_module_shapes(_meta_module(p, c, projection=True)), c) for p, c in configs.items()}
    return _sd3_sizes(parts, resolution, "SD3-medium's published configuration, built on the meta device")


@lru_cache(maxsize=8)
def _published_sizes(name: str, resolution: int) -> ModelSizes:
    """The published parameter counts; the shapes (LoRA's layers, the levels) from the published
    configs built on the ``meta`` device, which count to the same numbers."""
    parts = {}
    for part, config in PUBLISHED_CONFIGS[name].items():
        module = _meta_module(part, config)
        parts[part] = (_module_shapes(module), dict(module.config) if part != "text_encoder" else {})
    sizes = _sizes(parts, resolution, "from the published sizes")
    return replace(sizes, params=dict(PUBLISHED_PARAMS[name]))


def _tiny_sizes(model_cfg) -> ModelSizes:
    import torch

    from unlearn_exp.models.tiny import build_tiny

    with torch.device("meta"):
        comps = build_tiny(
            seed=0, resolution=int(model_cfg.get("resolution", 32)), vae=bool(model_cfg.get("vae", True))
        )
    parts = {
        p: (_module_shapes(m), dict(m.config) if p != "text_encoder" else {})
        for p, m in comps.modules().items()
    }
    return _sizes(parts, int(model_cfg.get("resolution", 32)), "the tiny model, built on the meta device")


def model_sizes(model_cfg) -> ModelSizes | None:
    """The sizes of the model ``model_cfg`` names: counted from its folder where it is here, else
    from the published sizes of the named model (SD3: SD3-medium's configuration); None where neither
    is known."""
    if family_of(model_cfg).name == "sd3":
        return _sd3_model_sizes(model_cfg)
    if model_cfg.get("source") == "tiny":
        return _tiny_sizes(model_cfg)
    resolution = int(model_cfg.get("resolution", 512))
    folder = model_folder(model_cfg)
    if folder is not None:
        parts = {p: found for p in PARTS if (found := _part_shapes(folder, p)) is not None}
        if "unet" in parts:
            if not model_cfg.get("vae", True):
                parts.pop("vae", None)
            return _sizes(parts, resolution, f"counted from {folder}")
    name = str(model_cfg.get("name"))
    if name in PUBLISHED_CONFIGS:
        return _published_sizes(name, resolution)
    return None


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One stage's estimated peak: weights, what it holds besides, activations (bytes)."""

    name: str
    what: str
    weights: float
    held: float
    activations: float

    @property
    def peak(self) -> float:
        return self.weights + self.held + self.activations


# judges and PP metrics that run on the GPU: (parameters, activation bytes per image at 512 px)
JUDGE_GPU = {"q16": (303_966_208, 24 * 2**20)}  # CLIP ViT-L/14's image tower (224 px inputs)
METRIC_GPU = {"lpips_alex": (2_470_848, 16 * 2**20)}  # AlexNet's features and LPIPS' linear layers
CPU_JUDGES = ("nudenet", "nudenet_classifier", "toy")  # onnxruntime or the CPU: no GPU memory


def _gpu_dtype(model_cfg) -> str:
    """The dtype the model runs in on a GPU (``auto``: float16)."""
    name = str(model_cfg.get("dtype", "float32"))
    return "float16" if name == "auto" else name


def _weights(sizes: ModelSizes, element_bytes: int, float32: tuple[str, ...] = ()) -> float:
    return float(sum(n * (4 if p in float32 else element_bytes) for p, n in sizes.params.items()))


def _pass_bytes(precision: str) -> tuple[float, float]:
    """Bytes per activation element of a training pass and of a pass without gradients."""
    if precision.endswith("-mixed"):
        return 4 * MIXED_SHARE, 2.0
    return (2.0, 2.0) if precision.startswith(("16", "bf16")) else (4.0, 4.0)


def sampling_stage(sizes: ModelSizes, eb: int, images: int, branches: int, slicing: bool, name: str) -> Stage:
    """Sampling ``images`` at once, ``branches`` denoiser rows each per step, then decoding them."""
    unet = activation_bytes(sizes.kind("infer"), sizes.denoiser_elements(), images * branches, eb)
    decode = activation_bytes("vae_decode", sizes.vae_elements(), 1 if slicing else images, eb)
    what = f"{images} images x {branches} {'UNet' if sizes.family == 'sd1' else 'transformer'} rows"
    return Stage(name, what, _weights(sizes, eb), 0.0, max(unet, decode))


def pairs_stage(sizes: ModelSizes, eb: int, pair_batch: int) -> Stage:
    """DUO's pairs: the unsafe images with classifier-free guidance, their SDEdit counterparts (encoded)."""
    s = sampling_stage(sizes, eb, pair_batch, 2, False, "DUO pairs")
    encode = activation_bytes("vae_encode", sizes.vae_elements(), pair_batch, eb)
    return Stage(s.name, s.what + ", then SDEdit's encoding", s.weights, 0.0, max(s.activations, encode))


def duo_stage(sizes: ModelSizes, eb: int, ck: dict[str, Any], n_pairs: int) -> Stage:
    """DUO: ``3 x batch`` rows forward and backward through the UNet with LoRA, the same rows forward
    through the frozen reference, the pairs encoded by a float32 VAE."""
    b, rank = int(ck.get("batch") or 4), int(ck.get("rank") or 32)
    precision = resolved_precision(ck.get("precision"), "cuda")
    train_b, infer_b = _pass_bytes(precision)
    lora = sizes.lora_params(rank, list(ck.get("target_modules") or []))
    held = 16.0 * lora + 2 * n_pairs * 3 * sizes.resolution**2  # optimiser state; pair images (uint8)
    text = SD3_TEXT["sampling"] if ck.get("text_length") is None else 77 + int(ck["text_length"])
    side = int(ck.get("train_resolution") or sizes.resolution)  # DUO's SD3 recipe trains at 512 px
    factor = 2 ** (len(sizes.vae_channels) - 1) if sizes.vae_channels else 1
    at = replace(sizes, latent=(sizes.latent[0], side // factor), resolution=side)
    e_train = at.denoiser_elements(train=True, text_tokens=text)
    e = at.denoiser_elements(text_tokens=text)
    passes = activation_bytes(sizes.kind("train"), e_train, 3 * b, train_b) + activation_bytes(
        sizes.kind("infer"), e, 3 * b, infer_b
    )
    encode = activation_bytes("vae_encode", at.vae_elements(), 2 * b, 4)
    what = f"LoRA rank {rank} ({lora / 1e6:.2f}M), 3 x {b} rows forward+backward and forward, {precision}"
    return Stage("DUO training", what, _weights(sizes, eb, ("vae",)), held, max(passes, encode))


def esd_stage(sizes: ModelSizes, eb: int, ck: dict[str, Any], trained: int) -> Stage:
    """ESD: the variant's parameters trained in float32 with Adam (16 bytes each beyond the weights:
    float32 in place of the model's dtype, gradient, two moments, the saved original), ``batch`` rows
    forward and backward, and twice as many forward through the frozen model (its partial sampling
    and its two targets), one after the other. ``trained``: the parameters its variant trains."""
    b = int(ck.get("batch") or 1)
    variant = str(ck.get("variant") or "esd-u")
    precision = resolved_precision(ck.get("precision"), "cuda")
    train_b, infer_b = _pass_bytes(precision)
    # per trained parameter: float32 in place of the model's dtype (4 - eb), gradient 4, moments 8, the
    # saved original eb: 16 bytes
    held = 16.0 * trained
    passes = max(
        activation_bytes(sizes.kind("train"), sizes.denoiser_elements(train=True), b, train_b),
        activation_bytes(sizes.kind("infer"), sizes.denoiser_elements(), 2 * b, infer_b),
    )
    rows = f"{b} row{'s' if b != 1 else ''}"
    what = f"{variant} ({trained / 1e6:.1f}M trained), {rows} forward+backward, {precision}"
    return Stage("ESD training", what, _weights(sizes, eb), held, passes)


def inversion_stage(sizes: ModelSizes, eb: int, inv: dict[str, Any], n_images: int) -> Stage:
    """Concept inversion: ``inversion.batch_size`` rows forward and backward through the frozen UNet
    (the gradient reaches the embedding through it), a float32 text encoder, the image set encoded once."""
    b = int(inv.get("batch_size") or 1)
    precision = resolved_precision(inv.get("precision"), "cuda")
    train_b, _ = _pass_bytes(precision)
    held = float(n_images * 3 * sizes.resolution**2 * 4)  # the image set, float32
    passes = activation_bytes(sizes.kind("train"), sizes.denoiser_elements(train=True), b, train_b)
    encode = activation_bytes("vae_encode", sizes.vae_elements(), min(8, max(n_images, 1)), eb)
    what = f"{b} row{'s' if b != 1 else ''} forward+backward to the embedding, {precision}"
    text_encoders = tuple(p for p in sizes.params if p.startswith("text_encoder"))  # float32 (6.2)
    return Stage("concept inversion", what, _weights(sizes, eb, text_encoders), held, max(passes, encode))


def judging_stage(sizes: ModelSizes, eb: int, judge: dict[str, Any], metric: dict[str, Any]) -> Stage:
    """The judge and the PP metric on the cell's images, the model still loaded."""
    kind, name = str(judge.get("type") or judge.get("name")), str(metric.get("name"))
    params, per_image = JUDGE_GPU.get(kind, (0, 0))
    judge_bytes = 2 if str(judge.get("dtype")) in ("float16", "bfloat16") else 4
    m_params, m_per_image = METRIC_GPU.get(name, (0, 0))
    scale = (sizes.resolution / 512) ** 2
    held = params * judge_bytes + m_params * 4.0
    acts = max(
        per_image * int(judge.get("batch_size") or 1),
        m_per_image * scale * int(metric.get("batch_size") or 1),
    )
    where = "on the CPU" if params == 0 else "on the GPU"
    return Stage("judging", f"{kind} {where}, PP {name}", _weights(sizes, eb), held, acts)


def cell_stages(
    cfg, sizes: ModelSizes, branches: int, n_pairs: int = 1, esd_trained: int = 0
) -> dict[str, Stage]:
    """The stages a cell of ``cfg`` may run, by the name the planner's work uses; ``branches``: UNet
    rows per image of its guidance, ``n_pairs``: the most pairs one of its DUO adapters trains on,
    ``esd_trained``: the parameters its ESD variant trains."""
    eb = DTYPE_BYTES.get(_gpu_dtype(cfg.model), 4)
    s = cfg.sampling
    ck = dict(to_plain(cfg.checkpoint))
    inv = dict(to_plain(cfg.inversion))
    slicing = bool(s.get("vae_slicing"))
    guidance = f"sampling, {cfg.guidance.name}" if branches > 2 else "sampling, classifier-free guidance"
    out = {
        "sampling": sampling_stage(sizes, eb, int(s.batch_size), branches, slicing, guidance),
        "image_set": sampling_stage(sizes, eb, int(s.batch_size), 2, slicing, "C* image set"),
        "inversion": inversion_stage(sizes, eb, inv, int((inv.get("image_set") or {}).get("n_images") or 0)),
        "judging": judging_stage(sizes, eb, dict(to_plain(cfg.judge)), dict(to_plain(cfg.pp.metric))),
    }
    if ck.get("method") == "duo":
        out["pairs"] = pairs_stage(sizes, eb, int(ck.get("pair_batch") or 8))
        out["duo"] = duo_stage(sizes, eb, ck, n_pairs)
    if ck.get("method") == "esd" and not ck.get("path"):
        out["esd"] = esd_stage(sizes, eb, ck, esd_trained)
    return out


def fit_verdict(peak: float, gpu_gib: float | None) -> str:
    """Whether a peak of ``peak`` bytes fits a card of ``gpu_gib`` GiB, less ``CUDA_RESERVE_GIB``."""
    if not gpu_gib:
        return ""
    usable = gpu_gib - CUDA_RESERVE_GIB
    return f"fits {gpu_gib:g} GiB" if peak / GIB <= usable else f"does NOT fit {gpu_gib:g} GiB"


def gib(n_bytes: float) -> str:
    """Bytes in GiB: two decimals below 10 GiB (a toy model's stages read 0.02), one above."""
    value = n_bytes / GIB
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"
