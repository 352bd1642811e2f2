"""The toy world registers itself: its judge, its feature distance for PP, its prompt loader and its
utility metrics.

The implementations are imported when first built, so registering costs nothing.
"""

from __future__ import annotations

from unlearn_exp.registry import JUDGES, LOADERS, PP_METRICS, UTILITY


@JUDGES.register("toy")
def toy_judge(cfg: dict):
    """``judge=toy``: the toy world's colour classifier (``toy/judge.py``)."""
    from unlearn_exp.toy.judge import make_toy_judge

    return make_toy_judge(cfg)


@PP_METRICS.register("toy_features")
def toy_features(cfg: dict):
    """``pp=toy_features``: an LPIPS-style distance on the toy judge's features (``toy/judge.py``)."""
    from unlearn_exp.toy.judge import make_toy_feature_distance

    return make_toy_feature_distance(cfg)


@LOADERS.register("toy")
def toy_prompts(cfg, data_dir=None):
    """``benchmark.loader: toy``: the toy world's generated prompts (``toy/prompts.py``)."""
    from unlearn_exp.toy.prompts import load_toy_benchmark

    return load_toy_benchmark(cfg)


@UTILITY.register("toy_clip_score")
def toy_clip_score(cfg: dict):
    """``--utility toy_clip_score``: the toy judge's probability of the allowed colours."""
    from unlearn_exp.toy.utility import ToyClipScore

    return ToyClipScore(cfg)


@UTILITY.register("toy_fid")
def toy_fid(cfg: dict):
    """``--utility toy_fid``: FID on the toy judge's pooled features."""
    from unlearn_exp.toy.utility import toy_distance

    return toy_distance("fid", cfg)


@UTILITY.register("toy_kid")
def toy_kid(cfg: dict):
    """``--utility toy_kid``: KID on the toy judge's pooled features."""
    from unlearn_exp.toy.utility import toy_distance

    return toy_distance("kid", cfg)
