"""SAFREE: training-free safe generation by token projection, docs/methods.md 4.

1. Concept subspace (4.2): ``C = [pooled(E(n_k))]`` (D x K), ``P_C = C (C^T C)^+ C^T``.
2. Toxic-token detection (4.2): each prompt token ``i`` is masked (replaced by id 0) and the pooled
   embedding ``M_i`` of the masked prompt is taken, all tokens of all prompts in one batched
   text-encoder call. ``d_i = ||(I - P_C) M_i||``; token ``i`` is kept iff
   ``d_i < (1 + alpha) mean_{j != i} d_j`` (masking a trigger token moves the prompt away from the
   concept, so its residual is larger).
3. Projection (4.3): ``P_I = M^T (M M^T)^+ M``; trigger tokens are replaced by
   ``(I - P_C) P_I e`` (the official code's order; ``projection_order=paper`` gives ``P_I (I - P_C) e``).
4. Self-validating filter (4.4): ``t_sv = round(up_t * sigmoid(2 k (10 z - t0)))`` with
   ``z = 1 - mean cos(proj, e)`` over real tokens; the safe embedding is used for steps ``i <= t_sv``.
5. CFG with the joined keywords as the negative prompt (4.5).
6. Strength ``s`` (a toy-only knob, docs/toy.md 7; 1 everywhere else): the negative prompt becomes
   ``E("") + s (E(neg) - E(""))`` and the flagged tokens ``e + s (proj - e)``; 0 is plain CFG.
7. Latent re-attention (4.6): ``off`` (the official runs' behaviour, a no-op) or ``paper``: low
   frequencies of the decoder skip features of the safe branch are scaled by ``s`` where their
   magnitude exceeds the original prompt branch's.

``compat``: ``fixed`` (the steps above as stated) or ``official``, which reproduces three
behaviours of the official code (jaehong31/SAFREE, ``models/modified_stable_diffusion_pipeline.py``)
that change numbers:

- a prompt over CLIP's 77 tokens is sliced to its first 77 ids for masking, so no masked prompt holds
  an end-of-text token; the pooled embedding is then taken at ``argmax(ids)``, the start token, every
  masked prompt pools to the same vector and no token is flagged (the prompt is left as it is);
- a one-token prompt compares its distance with the mean of an empty list (NaN): the comparison is
  false and the single token is flagged and projected;
- both projectors are computed in float32 with ``torch.pinverse`` (``E (E^T E)^+ E^T``), and the
  trigger tokens' projection is evaluated as ``((I - P_C) P_I) e``.

On SD3 (docs/methods.md 4.8) the projection is ``sd3_official_projection`` (the official ``sdv3/``
code: T5 summaries, flags written into the CLIP positions, no filter) or ``sd3_fixed_projection``
(each text encoder in its own space); there is no latent re-attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from dataclasses import dataclass

import torch

from unlearn_exp.config import typed_preset
from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import Concept, Guidance, GuidanceState
from unlearn_exp.guidance.config import SAFREEConfig
from unlearn_exp.identity import without_neutral
from unlearn_exp.models.components import Components, Conditioning, TokenizedPrompts
from unlearn_exp.registry import GUIDANCE

MASK_TOKEN_ID = 0  # "!" in CLIP's vocabulary: the official code's mask token


def concept_projector(concept_pooled: torch.Tensor) -> torch.Tensor:
    """``P_C = C (C^T C)^+ C^T`` for ``concept_pooled`` of shape (K, D); returns (D, D)."""
    c = concept_pooled.double().T  # D x K
    return (c @ torch.linalg.pinv(c.T @ c) @ c.T).float()


def span_projector(masked_pooled: torch.Tensor) -> torch.Tensor:
    """``P_I = M^T (M M^T)^+ M`` for ``masked_pooled`` of shape (n, D); returns (D, D)."""
    m = masked_pooled.double()
    return (m.T @ torch.linalg.pinv(m @ m.T) @ m).float()


def official_projection_matrix(e: torch.Tensor) -> torch.Tensor:
    """The official code's ``E (E^T E)^+ E^T`` in float32 with ``torch.pinverse``, ``e``: (D, n)."""
    e = e.float()
    return e @ torch.pinverse(e.T @ e) @ e.T


def official_keep(dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official comparison ``d_i < (1 + alpha) mean_{j != i} d_j``, with the mean of an empty list
    being NaN (so a one-token prompt's token is flagged)."""
    n = dist.numel()
    means = torch.stack([torch.cat((dist[:i], dist[i + 1 :])).mean() for i in range(n)])
    return dist < (1.0 + alpha) * means


def official_masked_pooled(
    comps: Components, prompts: list[str]
) -> tuple[list[int], torch.Tensor | None, list[bool]]:
    """The official ``_masked_encode_prompt`` for each prompt: its untruncated ids sliced to 77, one
    word masked (id 0) per row, pooled at ``argmax(ids)``, one text-encoder call per prompt at the
    prompt's own length (as the official code runs it: the float32 projector that follows is
    sensitive to the last bits). Returns the masked-word count per prompt, the stacked pooled rows
    and whether each prompt was sliced (no end-of-text token: all its rows pool at the start token)."""
    max_len = comps.tokenizer.model_max_length
    full = comps.tokenizer(list(prompts), padding=False, truncation=False, verbose=False).input_ids
    counts, pooled, sliced = [], [], []
    for ids in full:
        ids = torch.tensor(list(ids)[:max_len], device=comps.device)
        sliced.append(len(ids) == max_len and int(ids[-1]) != comps.tokenizer.eos_token_id)
        n = max(len(ids) - 2, 0)
        counts.append(n)
        if n == 0:
            continue
        masked = ids.repeat(n, 1)
        masked[torch.arange(n), torch.arange(1, n + 1)] = MASK_TOKEN_ID
        hidden = comps.text_encoder(masked).last_hidden_state
        pooled.append(hidden[torch.arange(n, device=hidden.device), masked.to(torch.int).argmax(dim=-1)])
    return counts, (torch.cat(pooled).float() if pooled else None), sliced


def detect_trigger_tokens(masked_pooled: torch.Tensor, p_c: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean ``keep`` per token (True = safe token), from the residuals to the concept subspace."""
    eye = torch.eye(p_c.shape[0], dtype=p_c.dtype, device=p_c.device)
    dist = ((eye - p_c) @ masked_pooled.float().T).norm(dim=0)  # (n,)
    n = dist.numel()
    if n < 2:  # nothing to compare against: keep the token
        return torch.ones(n, dtype=torch.bool, device=dist.device)
    mean_others = (dist.sum() - dist) / (n - 1)
    return dist < (1 + alpha) * mean_others


def masked_pooled_embeddings(
    comps: Components, tokens: TokenizedPrompts
) -> tuple[list[int], torch.Tensor | None]:
    """Pooled embeddings of every prompt with one word token masked (id 0), for all words of all
    prompts in one batched text-encoder call. Returns the word count per prompt and the stacked
    (sum of counts, D) embeddings. A prompt cut at 77 tokens has 75 maskable words."""
    counts, masked = [], []
    for b in range(tokens.input_ids.shape[0]):
        n = max(min(tokens.n_tokens[b] - 2, tokens.input_ids.shape[1] - 2), 0)
        counts.append(n)
        for i in range(1, n + 1):
            ids = tokens.input_ids[b].clone()
            ids[i] = MASK_TOKEN_ID
            masked.append(ids)
    if not masked:
        return counts, None
    return counts, comps.encode_ids(torch.stack(masked))[1].float()


def svf_steps(z: float, up_t: int = 10, k: float = 2.5, t0: float = 5.333) -> int:
    """Self-validating filter: ``round(up_t * sigmoid(2 k (10 z - t0)))`` (Python rounding, half to even)."""
    return round(up_t / (1 + math.exp(-2.0 * k * (10.0 * z - t0))))


@dataclass
class Projection:
    """SAFREE's per-prompt conditioning in one mode: safe embeddings (B, 77, D) in float32, the
    self-validating filter's last safe step per prompt, and what each prompt's row records."""

    safe_e: torch.Tensor
    t_sv: list[int | None]
    info: list[dict]


# two modes' safe embeddings closer than this (relative to the embedding's largest entry) condition
# the UNet alike: float32 against float64 projectors of a well-conditioned Gram matrix differ by ~1e-6
COMPAT_TOLERANCE = 1e-3


def compat_differs(a: Projection, b: Projection, i: int, svf: bool) -> bool:
    """Whether prompt ``i`` is conditioned differently by two modes: other tokens flagged, a safe
    embedding that differs beyond float tolerance, or (with the filter on) another step count."""
    if a.info[i]["safree_triggers"] != b.info[i]["safree_triggers"]:
        return True
    if svf and a.t_sv[i] != b.t_sv[i]:
        return True
    scale = max(1.0, float(a.safe_e[i].abs().max()))
    return bool((a.safe_e[i] - b.safe_e[i]).abs().max() > COMPAT_TOLERANCE * scale)


class SAFREE(Guidance):
    name = "safree"

    def __init__(
        self, concept_prompts: list[str], negative_prompt: str, settings: SAFREEConfig | None = None
    ):
        if not concept_prompts or any(not str(c).strip() for c in concept_prompts):
            raise UserError("SAFREE needs a non-empty list of concept keywords or tokens (got an empty one)")
        self.concept_prompts = list(concept_prompts)
        self.negative_prompt = negative_prompt
        self.settings = settings or typed_preset(SAFREEConfig, "safree")

    def unet_branches(self, guidance_scale: float) -> int:
        return 3 if self.settings.lra == "paper" else 2  # lra=paper: the original prompt's branch

    # -------------------------------------------------------------------- preparation
    def prepare(
        self,
        comps: Components,
        prompts: list[str],
        tokens: TokenizedPrompts,
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_steps: int,
    ) -> GuidanceState:
        p = self.settings
        cond = comps.condition(tokens)
        text_e = cond.sequence
        project = self._project_sd3 if comps.family == "sd3" else self._project
        if comps.family == "sd3" and p.lra == "paper":
            raise UserError(
                "SAFREE's latent re-attention (guidance.lra=paper) filters UNet features: not on SD3"
            )
        mine = project(comps, prompts, tokens, text_e, p.compat)
        # the other mode too, to record per prompt whether the two modes condition it differently
        # (none where it cannot run: SD3's official mode without T5, e.g. the toy MMDiT)
        other_mode = "fixed" if p.compat == "official" else "official"
        other = None if _needs_t5(comps, other_mode) else project(comps, prompts, tokens, text_e, other_mode)
        safe_e, meta = mine.safe_e.to(text_e.dtype), []
        for b, info in enumerate(mine.info):
            differs = None if other is None else compat_differs(mine, other, b, p.svf)
            meta.append({**info, "safree_compat": p.compat, "safree_compat_differs": differs})
        t_sv = mine.t_sv

        uncond = comps.condition_prompts([self.negative_prompt] * len(prompts))
        if p.strength != 1.0:  # both edits scaled by s (docs/toy.md 7); s = 1 leaves SAFREE untouched
            empty = comps.condition_prompts([""] * len(prompts))
            uncond = empty.lerp(uncond, p.strength)
            safe_e = (text_e + p.strength * (safe_e - text_e)).to(text_e.dtype)
        branches = [uncond, cond] + ([cond] if p.lra == "paper" else [])
        state = GuidanceState(
            branches=branches, guidance_scale=guidance_scale, num_steps=num_steps, meta=meta
        )
        state.extra.update(text_e=text_e, safe_e=safe_e, t_sv=t_sv, every_step=comps.family == "sd3")
        return state

    def _project(
        self,
        comps: Components,
        prompts: list[str],
        tokens: TokenizedPrompts,
        text_e: torch.Tensor,
        compat: str,
    ) -> Projection:
        """Steps 2-4 in one mode (``compat``): the flagged tokens, the safe embeddings (float32) and
        the self-validating filter's step count of every prompt."""
        p = self.settings
        _, concept_pooled = comps.encode_ids(comps.tokenize(self.concept_prompts).input_ids)
        official = compat == "official"
        p_c = official_projection_matrix(concept_pooled.T) if official else concept_projector(concept_pooled)
        eye = torch.eye(p_c.shape[0], device=p_c.device)
        if official:
            counts, masked_pooled, sliced = official_masked_pooled(comps, prompts)
        else:
            (counts, masked_pooled), sliced = masked_pooled_embeddings(comps, tokens), [False] * len(prompts)
        safe_e, t_sv, info, offset = text_e.float().clone(), [], [], 0
        for b, n in enumerate(counts):
            e = text_e[b].float()
            if n == 0:
                t_sv.append(-1)
                info.append(
                    {
                        "safree_n_tokens": 0,
                        "safree_triggers": [],
                        "safree_t_sv": -1,
                        "safree_note": "empty prompt",
                    }
                )
                continue
            m = masked_pooled[offset : offset + n]
            offset += n
            if official:
                keep = official_keep(((eye - p_c) @ m.T).norm(dim=0), p.alpha)
                p_i = official_projection_matrix(m.T)
            else:
                keep = detect_trigger_tokens(m, p_c, p.alpha)
                p_i = span_projector(m)
            op = (eye - p_c) @ p_i if p.projection_order == "code" else p_i @ (eye - p_c)
            proj = (op @ e.T).T  # all 77 tokens projected
            mask = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
            mask[1 : n + 1] = keep
            safe_e[b] = torch.where(mask[:, None], e, proj)
            active = tokens.attention_mask[b].bool()
            z = 1.0 - torch.nn.functional.cosine_similarity(proj[active], e[active], dim=-1).mean().item()
            steps = svf_steps(z, self.steps(p.up_t), p.svf_k, p.svf_t0) if p.svf else None
            t_sv.append(steps)
            info.append(
                {
                    "safree_n_tokens": n,
                    "safree_triggers": [int(i) for i in (~keep).nonzero().flatten().tolist()],
                    "safree_t_sv": steps if steps is not None else -1,
                    **({"safree_note": "sliced at 77 ids: pooled at the start token"} if sliced[b] else {}),
                }
            )
        return Projection(safe_e, t_sv, info)

    def _project_sd3(
        self, comps, prompts: list[str], tokens: TokenizedPrompts, text_e: torch.Tensor, compat: str
    ) -> Projection:
        """SAFREE on SD3 (docs/methods.md 4.8): ``official`` as ``sdv3/`` does it, ``fixed`` each
        encoder in its own space (``sd3_official_projection``, ``sd3_fixed_projection``). No
        self-validating filter: the official SD3 code uses the safe embedding at every step."""
        if _needs_t5(comps, compat):
            raise UserError(
                "SAFREE's official SD3 code detects trigger tokens with T5: load it (model.t5=true), "
                "or set guidance.compat=fixed (each CLIP encoder finds its own)"
            )
        alpha = float(self.settings.alpha)
        safe_e, t_sv, info = text_e.float().clone(), [], []
        for b, prompt in enumerate(prompts):
            if compat == "official":
                safe_e[b], triggers = sd3_official_projection(
                    comps, prompt, text_e[b], self.concept_prompts, alpha
                )
            else:
                safe_e[b], triggers = sd3_fixed_projection(
                    comps, prompt, text_e[b], self.concept_prompts, alpha
                )
            t_sv.append(-1)  # no filter: every step (use_safe)
            info.append(
                {
                    "safree_n_tokens": int(tokens.n_tokens[b]) - 2,
                    "safree_triggers": triggers,
                    "safree_t_sv": -1,
                    "safree_note": "sd3: every step, no filter",
                }
            )
        return Projection(safe_e, t_sv, info)

    def use_safe(self, i: int, state: GuidanceState) -> list[bool]:
        """Per image: does step ``i`` use the safe embedding? (SVF, or the re_attn_t window; on SD3
        every step)."""
        p = self.settings
        if state.extra.get("every_step"):
            return [True] * len(state.extra["t_sv"])
        if p.svf:
            return [i <= t for t in state.extra["t_sv"]]
        lo, hi = p.re_attn_t
        return [self.in_window(i, int(lo), int(hi))] * len(state.extra["t_sv"])

    def embeddings(self, i: int, state: GuidanceState) -> Conditioning:
        text_e, safe_e = state.extra["text_e"], state.extra["safe_e"]
        use = torch.tensor(self.use_safe(i, state), device=text_e.device)[:, None, None]
        # the branch's own dtype (the sampler casts the branches): text_e and safe_e are as encoded
        prompt = state.branches[1]
        cond = Conditioning(torch.where(use, safe_e, text_e).to(prompt.sequence.dtype), prompt.pooled)
        # with lra=paper a third branch (the original prompt) only feeds the re-attention hooks
        return Conditioning.cat([state.branches[0], cond, *state.branches[2:]])

    def combine(self, i: int, preds: list[torch.Tensor], state: GuidanceState) -> torch.Tensor:
        eps_u, eps_c = preds[0], preds[1]
        return eps_u + state.guidance_scale * (eps_c - eps_u)

    # ------------------------------------------------------------ latent re-attention
    def unet_hooks(self, i: int, state: GuidanceState, unet: torch.nn.Module):
        if self.settings.lra != "paper":
            return contextlib.nullcontext()
        return _fourier_reattention(unet, self.use_safe(i, state), self.settings)

    def describe(self) -> dict:
        p = self.settings
        skip = ("name", "keywords", "cfg_negative", "up_t", "re_attn_t")  # in the prompts; scaled below
        values = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in skip}
        values = {k: str(v) if isinstance(v, enum.Enum) else v for k, v in values.items()}
        values = without_neutral("guidance", values)  # keys added later, at their neutral value
        return {
            "name": self.name,
            "concept_prompts": self.concept_prompts,
            "negative_prompt": self.negative_prompt,
            **values,
            "up_t": self.steps(p.up_t),  # on this sampler
            "re_attn_t": [self.steps(int(t)) for t in p.re_attn_t],
        }


def low_frequency_reattention(h_safe: torch.Tensor, h_orig: torch.Tensor, scale: float, window: int = 1):
    """Paper Eq. 7-8: in the centred ``2w x 2w`` low-frequency window, Fourier coefficients of the
    safe branch whose magnitude exceeds the original branch's are multiplied by ``scale``."""
    dtype = h_safe.dtype
    fs = torch.fft.fftshift(torch.fft.fftn(h_safe.float(), dim=(-2, -1)), dim=(-2, -1))
    fo = torch.fft.fftshift(torch.fft.fftn(h_orig.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = fs.shape[-2:]
    cy, cx = h // 2, w // 2
    band = torch.zeros(h, w, dtype=torch.bool, device=fs.device)
    band[max(cy - window, 0) : cy + window, max(cx - window, 0) : cx + window] = True
    damp = band & (fs.abs() > fo.abs())
    fs = torch.where(damp, fs * scale, fs)
    out = torch.fft.ifftn(torch.fft.ifftshift(fs, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(dtype)


@contextlib.contextmanager
def _fourier_reattention(unet: torch.nn.Module, use_safe: list[bool], p: SAFREEConfig):
    """Pre-hooks on the UNet's up blocks (the FreeU locations). Batch rows are [uncond, safe, orig].

    Departure (documented): FreeU scales the backbone half ``hidden[:, :C/2] *= b`` before every
    skip concatenation; here it is applied to the block's input only. Skip features are filtered
    per resnet, with the stage decided by that resnet's backbone channel count, as in FreeU.
    """
    deep, second = unet.config.block_out_channels[-1], unet.config.block_out_channels[-2]
    stage = {deep: (p.lra_b1, p.lra_s1), second: (p.lra_b2, p.lra_s2)}
    rows = torch.tensor(use_safe)
    handles = []

    def hook(block, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        skips = kwargs.get("res_hidden_states_tuple")
        if hidden is None or skips is None or not rows.any():
            return None
        b = hidden.shape[0] // 3
        sel = rows.to(hidden.device)
        if hidden.shape[1] in stage and stage[hidden.shape[1]][0] != 1.0:
            hidden = hidden.clone()
            half = hidden.shape[1] // 2
            scaled = hidden[b : 2 * b, :half] * stage[hidden.shape[1]][0]
            hidden[b : 2 * b, :half] = torch.where(sel[:, None, None, None], scaled, hidden[b : 2 * b, :half])
        new_skips = list(skips)
        for r, resnet in enumerate(block.resnets):
            k = len(skips) - 1 - r  # resnet r consumes the skips from the end
            skip = skips[k]
            hidden_ch = resnet.conv1.in_channels - skip.shape[1]
            if hidden_ch not in stage:
                continue
            filtered = low_frequency_reattention(skip[b : 2 * b], skip[2 * b :], stage[hidden_ch][1])
            skip = skip.clone()
            skip[b : 2 * b] = torch.where(sel[:, None, None, None], filtered, skip[b : 2 * b])
            new_skips[k] = skip
        kwargs = dict(kwargs)
        kwargs["res_hidden_states_tuple"] = tuple(new_skips)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    try:
        for block in unet.up_blocks:
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- SD3 (sdv3/)
SD3_JOINT_LENGTH = 333  # the official code's mask length: 77 CLIP + 256 T5 positions


def _t5_first_states(comps, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return comps.text_encoder_3(ids.to(comps.device), attention_mask=mask).last_hidden_state[:, 0, :]


def sd3_official_projection(
    comps, prompt: str, text_e: torch.Tensor, concepts: list[str], alpha: float
) -> tuple[torch.Tensor, list[int]]:
    """One prompt's safe joint sequence as the official SD3 code (``sdv3/sdv3_pipeline.py``) computes
    it, with its quirks: summaries are T5's first-position state (concepts padded to 256 with their
    attention mask, masked prompts unpadded without one); the prompt's T5 ids are taken as
    ``[BOS, words, EOS]`` (T5 has no BOS), so ``n = len(ids) - 2`` rows mask ids ``1..n`` with the pad
    id 0; distances and the projection run in bfloat16, the projectors in float32 (``pinverse``);
    the flags, found on T5 positions, are written at joint positions ``1..n`` (the CLIP part) and the
    T5-space projection replaces the joint sequence there. Returns (safe sequence in float32, the
    joint positions changed)."""
    tok = comps.tokenizer_3
    c = tok(list(concepts), padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    concept_states = _t5_first_states(comps, c.input_ids, c.attention_mask.to(comps.device))
    ids = tok([prompt], padding="longest", max_length=256, truncation=True, return_tensors="pt").input_ids
    n = ids.shape[1] - 2
    text = text_e.float()
    if n <= 0:
        return text, []
    masked = ids.repeat(n, 1)
    masked[torch.arange(n), torch.arange(1, n + 1)] = 0
    p_emb = _t5_first_states(comps, masked, None)
    p_c = official_projection_matrix(concept_states.T)
    p_m = official_projection_matrix(p_emb.T)
    i_m_cs = torch.eye(p_c.shape[0], device=p_c.device) - p_c
    dist = torch.norm(i_m_cs.bfloat16() @ p_emb.T.bfloat16(), dim=0)
    keep = official_keep(dist, alpha)
    ones = torch.ones(SD3_JOINT_LENGTH, device=text.device)
    ones[1 : n + 1] = keep.float()
    new = (i_m_cs.bfloat16() @ p_m.bfloat16() @ text.T.bfloat16()).T
    merged = torch.where(ones.bool()[: text.shape[0], None], text, new.float())
    return merged, [int(i) + 1 for i in (~keep).nonzero().flatten().tolist()]


def _needs_t5(comps, compat: str) -> bool:
    """SD3's official mode finds trigger tokens with T5 alone: it cannot run without it."""
    return comps.family == "sd3" and compat == "official" and comps.text_encoder_3 is None


def _clip_states(encoder, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP encoder's penultimate states (what SD3 conditions on) and the state at the first EOS."""
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
    eos = (ids == eos_id).int().argmax(dim=-1)
    return hidden, hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]


def _encoder_views(comps, concepts: list[str], prompt: str):
    """Per SD3 text encoder: (name, first joint position, first feature, width, the maskable word
    positions, their summaries with that word masked, the concepts' summaries). CLIP-L and CLIP-G
    (positions 0..76, features joined): penultimate states (what SD3 conditions on), summary at EOS,
    words between BOS and EOS masked with "!" (id 0, as SAFREE on SD v1). T5 (positions 77..):
    summary the mean of its last states over real tokens, words before EOS masked with its pad id 0;
    none without T5."""
    dev = comps.device
    views, feature = [], 0
    for name, enc, tok in (
        ("clip_l", comps.text_encoder, comps.tokenizer),
        ("clip_g", comps.text_encoder_2, comps.tokenizer_2),
    ):
        kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = tok([prompt], **kw).input_ids.to(dev)
        rows = list(range(1, int((ids[0] == tok.eos_token_id).int().argmax())))  # between BOS and EOS
        masked = ids.repeat(len(rows), 1)
        masked[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = MASK_TOKEN_ID
        summaries = _clip_states(enc, masked, tok.eos_token_id)[1] if rows else None
        concept = _clip_states(enc, tok(list(concepts), **kw).input_ids.to(dev), tok.eos_token_id)[1]
        width = int(enc.config.hidden_size)
        views.append((name, 0, feature, width, rows, summaries, concept))
        feature += width
    if comps.text_encoder_3 is None:  # no T5 (model.t5=false, the toy MMDiT): the CLIP encoders only
        return views

    def mean_states(ids, mask):
        h = comps.text_encoder_3(ids, attention_mask=mask).last_hidden_state
        return (h * mask.float()[..., None]).sum(1) / mask.float().sum(1, keepdim=True)

    tok = comps.tokenizer_3
    kw = dict(
        padding="max_length", max_length=comps.max_sequence_length, truncation=True, return_tensors="pt"
    )
    enc = tok([prompt], **kw)
    ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
    rows = list(range(int(mask.sum()) - 1))  # the words before EOS
    masked = ids.repeat(len(rows), 1)
    masked[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 0
    summaries = mean_states(masked, mask.repeat(len(rows), 1)) if rows else None
    c = tok(list(concepts), **kw)
    concept = mean_states(c.input_ids.to(dev), c.attention_mask.to(dev))
    views.append(("t5", 77, 0, int(comps.text_encoder_3.config.d_model), rows, summaries, concept))
    return views


def sd3_fixed_projection(
    comps, prompt: str, text_e: torch.Tensor, concepts: list[str], alpha: float
) -> tuple[torch.Tensor, list[int]]:
    """SAFREE on SD3 with the official code's SD3 quirks fixed: every encoder (CLIP-L, CLIP-G, T5)
    finds its own trigger tokens in its own space (the concept subspace and the span of the masked
    prompts from its own summaries, float64 projectors, ``detect_trigger_tokens``) and its flagged
    tokens are replaced by ``(I - P_C) P_I e`` at their own place in the joint sequence: CLIP-L's
    features of positions 0..76, CLIP-G's next ones, T5's positions 77.. . Returns (safe sequence in
    float32, the joint positions changed)."""
    out = text_e.float().clone()
    changed: set[int] = set()
    for _name, start, feature, width, rows, summaries, concept in _encoder_views(comps, concepts, prompt):
        if len(rows) < 2:
            continue  # nothing to compare against: kept (detect_trigger_tokens)
        p_c = concept_projector(concept.float())
        keep = detect_trigger_tokens(summaries.float(), p_c, alpha)
        op = (torch.eye(p_c.shape[0], device=p_c.device) - p_c) @ span_projector(summaries.float())
        for r, k in zip(rows, keep.tolist()):
            if not k:
                out[start + r, feature : feature + width] = op @ out[start + r, feature : feature + width]
                changed.add(start + r)
    return out, sorted(changed)


@GUIDANCE.register("safree")
def build_safree(guidance_cfg, task_cfg, concept: Concept) -> SAFREE:
    """``guidance=safree``: the subspace is spanned by the pooled embeddings of the keywords (explicit)
    or of each learned token (rank K)."""
    s = SAFREEConfig.from_cfg(guidance_cfg)
    keywords = list(s.keywords or task_cfg.safree_keywords or [])
    if not keywords:
        raise UserError("SAFREE needs keywords: set guidance.keywords or the task's safree_keywords")
    if concept.learned:
        prompts = list(concept.tokens)
        negatives = {"concept": " ".join(concept.tokens), "keywords": ", ".join(keywords), "empty": ""}
        negative = negatives[s.cfg_negative]
    else:
        prompts, negative = keywords, ", ".join(keywords)
    return SAFREE(concept_prompts=prompts, negative_prompt=negative, settings=s)
