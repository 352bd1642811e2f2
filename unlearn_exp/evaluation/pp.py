"""PP: prior preservation, ``1 - mean_j d(x_j^{orig}, x_j^{method})`` for the same prompt and seed
(docs/methods.md 7.4).

A ``Distance`` maps two batches of images (RGB in [-1, 1], same prompt and seed pairwise) to one
distance per image; ``pp(distances)`` is ``1 - mean``. Profiles, like judges, carry a ``hash``.

- ``lpips_alex`` (``LPIPSDistance``): ``lpips.LPIPS(net="alex")`` of the ``lpips`` package, version
  0.1, at the images' own resolution (no resize to 64 px). The package ships only its linear heads;
  the AlexNet trunk is torchvision's ImageNet file ``alexnet-owt-7be5be79.pth``, read from
  ``trunk_path`` or the torch hub cache (``$TORCH_HOME/hub/checkpoints/``) with ``weights_only``.
- ``FeatureDistance(feature_fn, name)``: an LPIPS-style distance on any feature network (e.g. the
  toy judge's): per layer ``l`` the features are unit-normalised over channels, ``d_l = mean_hw
  sum_c (f_a - f_b)^2`` (in [0, 4]), and the distance is ``mean_l d_l``. Unlike LPIPS there are no
  learned per-channel weights, so it works for networks trained by this project, offline.

New profiles are added with ``register_pp_metric(kind, factory)``; configs pick one by
``type`` (default: ``name``).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.images import ImageLike, to_tensor
from unlearn_exp.hashing import config_hash, file_sha256, to_plain
from unlearn_exp.registry import PP_METRICS
from unlearn_exp.runtime import device as torch_device

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet: LPIPS's trunk
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
ALEXNET_SHA256 = "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"  # the file's (pinned)
PP_DEFAULTS = {"name": "lpips_alex", "net": "alex", "trunk_path": None, "lin_path": None}

if TYPE_CHECKING:  # torch is imported where a distance is computed: reading results needs none
    import torch

    Images = Sequence[ImageLike] | torch.Tensor


def pp(distances: Sequence[float] | torch.Tensor) -> float:
    """``1 - mean(distances)``; NaN for no pairs."""
    import torch

    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    return float("nan") if d.numel() == 0 else float(1.0 - d.mean())


class Distance(ABC):
    """Per-image perceptual distance between paired images; ``profile`` names and hashes it."""

    profile: dict
    batch_size: int = 8
    device: torch.device | str = "cpu"

    @abstractmethod
    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def distance(self, imgs_a: Images, imgs_b: Images) -> torch.Tensor:
        """(N,) distances between ``imgs_a[j]`` and ``imgs_b[j]`` (tensors in [-1, 1] or PIL images)."""
        import torch

        a, b = to_tensor(imgs_a), to_tensor(imgs_b)
        if a.shape != b.shape:
            raise UserError(
                f"PP compares images pairwise; got batches of shape {tuple(a.shape)} and {tuple(b.shape)}"
            )
        out = []
        with torch.no_grad():
            for i in range(0, a.shape[0], self.batch_size):
                sa = a[i : i + self.batch_size].to(self.device)
                sb = b[i : i + self.batch_size].to(self.device)
                out.append(self._distance(sa, sb).flatten().float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def pp(self, imgs_a: Images, imgs_b: Images) -> float:
        return pp(self.distance(imgs_a, imgs_b))


def _profile(**fields: Any) -> dict:
    hashed = {k: v for k, v in fields.items() if not k.endswith("_file")}
    return {**fields, "hash": config_hash(hashed)}


# ----------------------------------------------------------------------------- LPIPS (AlexNet)
def default_trunk_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a state dict: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {what} {path}: {first}") from None


class LPIPSDistance(Distance):
    """``lpips.LPIPS(net="alex")`` with its AlexNet trunk read from a local file (see module docstring)."""

    def __init__(self, cfg: dict[str, Any]):
        import lpips

        cfg = {**PP_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        if cfg["net"] != "alex":
            raise UserError(
                f"pp.net '{cfg['net']}' is not supported; LPIPS here uses net=alex (docs/methods.md 7.4)"
            )
        trunk = Path(str(cfg["trunk_path"])).expanduser() if cfg["trunk_path"] else default_trunk_path()
        if not trunk.is_file():
            raise UserError(
                f"LPIPS needs the AlexNet trunk {trunk.name} (torchvision's ImageNet AlexNet weights): "
                f"put it at {trunk} or set pp.metric.trunk_path; get it from {ALEXNET_URL} (`python -m "
                "unlearn_exp.assets --download` fetches it, sha256-checked)"
            )
        lin = (
            Path(str(cfg["lin_path"])).expanduser()
            if cfg["lin_path"]
            else Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
        )
        if not lin.is_file():
            raise UserError(f"LPIPS linear heads not found: {lin} (set pp.metric.lin_path)")
        trunk_sd = _load_state_dict(trunk, "the AlexNet trunk")
        lin_sd = _load_state_dict(lin, "the LPIPS linear heads")
        with (
            warnings.catch_warnings()
        ):  # lpips builds torchvision's AlexNet with the old `pretrained=` argument
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        missing = model.load_state_dict(lin_sd, strict=False).missing_keys
        if any(k.startswith(tuple(f"lin{i}." for i in range(5))) for k in missing):
            raise UserError(f"{lin} is not an LPIPS alex linear-head file (missing {missing[:2]})")
        self._load_trunk(model, trunk_sd, trunk)
        self.device = torch_device(cfg.get("device"))
        self.batch_size = int(cfg.get("batch_size") or 8)
        self.model = model.eval().to(self.device)
        self.profile = _profile(
            name=str(cfg["name"]),
            metric="lpips",
            net="alex",
            lpips_version="0.1",
            resize=None,
            trunk_file=str(trunk),
            trunk_sha256=file_sha256(trunk),
            lin_file=str(lin),
            lin_sha256=file_sha256(lin),
        )

    @staticmethod
    def _load_trunk(model, state: dict[str, torch.Tensor], path: Path) -> None:
        """Copy torchvision's ``features.<i>.*`` tensors into lpips' ``net.slice<k>.<i>.*``."""
        import torch

        copied = 0
        for k in range(1, 6):
            for child, module in getattr(model.net, f"slice{k}").named_children():
                for pname, param in module.named_parameters():
                    key = f"features.{child}.{pname}"
                    if key not in state or state[key].shape != param.shape:
                        raise UserError(f"{path} is not torchvision AlexNet weights (no matching '{key}')")
                    with torch.no_grad():
                        param.copy_(state[key])
                    copied += 1
        if copied != 10:  # pragma: no cover - 5 conv layers, weight and bias
            raise UserError(f"{path}: expected 10 AlexNet conv tensors, copied {copied}")

    def _distance(self, a, b):
        return self.model(a, b)


# ----------------------------------------------------------------------------- feature distance
class FeatureDistance(Distance):
    """LPIPS-style distance on ``feature_fn(images in [-1, 1]) -> list of (B, C[, H, W]) tensors``."""

    def __init__(
        self,
        feature_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        name: str,
        *,
        model_file: str = "",
        model_sha256: str = "",
        batch_size: int = 16,
        device: str | torch.device | None = "cpu",
        **extra: Any,
    ):
        self.feature_fn = feature_fn
        self.batch_size = int(batch_size)
        self.device = torch_device(str(device) if device is not None else "cpu")
        self.profile = _profile(
            name=str(name),
            metric="feature_distance",
            rule="mean over layers of mean_hw sum_c (unit(f_a) - unit(f_b))^2",
            model_file=str(model_file),
            model_sha256=str(model_sha256),
            **extra,
        )

    @staticmethod
    def layer_distance(fa: torch.Tensor, fb: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        fa, fb = fa.float(), fb.float()
        na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        d = (na - nb).pow(2).sum(dim=1)
        return d.flatten(1).mean(dim=1) if d.ndim > 1 else d

    def _distance(self, a, b):
        import torch

        feats_a, feats_b = list(self.feature_fn(a)), list(self.feature_fn(b))
        if not feats_a or len(feats_a) != len(feats_b):
            raise UserError(f"distance '{self.profile['name']}': the feature network returned no layers")
        return torch.stack([self.layer_distance(x, y) for x, y in zip(feats_a, feats_b)]).mean(dim=0)


# ----------------------------------------------------------------------------- registry
PPFactory = Callable[[dict], Distance]
PP_METRICS.register("lpips", LPIPSDistance)
PP_METRICS.register("lpips_alex", LPIPSDistance)


def register_pp_metric(kind: str, factory: PPFactory) -> None:
    """Make ``pp.type: <kind>`` (or a profile named ``<kind>``) build its distance with ``factory(cfg)``."""
    PP_METRICS.register(kind, factory)


def make_pp_metric(cfg_pp: Any = None, *, cache: bool = True) -> Distance:
    """The distance a PP config names (default ``lpips_alex``); one instance per config per process."""
    plain = {**PP_DEFAULTS, **(dict(to_plain(cfg_pp)) if cfg_pp is not None else {})}
    return PP_METRICS.build(plain, cache=cache)
