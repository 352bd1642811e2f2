"""The target paper's reported numbers (docs/methods.md 1.2), as data.

Source: arXiv 2511.04834 as quoted by a paper-notes summary (docs/methods.md 1.2, tag [paper-note]).
These are the regression targets that ``unlearn_exp.report`` prints beside our own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# The five methods of the main tables, in the paper's order, and the (guidance, embedding source)
# grid cell each one is (docs/design.md 1). DUO alone ignores the embedding axis.
METHODS: tuple[str, ...] = ("DUO", "DUO+SLD", "DUO+SLD+Ours", "DUO+SAFREE", "DUO+SAFREE+Ours")
METHOD_CELLS: dict[str, tuple[str, str | None]] = {
    "DUO": ("none", None),
    "DUO+SLD": ("sld", "explicit"),
    "DUO+SLD+Ours": ("sld", "inverted"),
    "DUO+SAFREE": ("safree", "explicit"),
    "DUO+SAFREE+Ours": ("safree", "inverted"),
}

# The transfer table's methods: C* learned on DUO beta=500 (embedding source "shared").
TRANSFER_METHODS: dict[str, str] = {"SLD+Ours": "sld", "SAFREE+Ours": "safree"}
TRANSFER_SOURCE_BETA = 500

# The DUO beta values of the paper's checkpoints, and the beta of each task's main table.
BETAS: tuple[int, ...] = (250, 500, 1000, 2000)
MAIN_BETA: dict[str, int] = {"violence": 1000, "nudity": 2000}
BENCHMARK: dict[str, str] = {"violence": "Ring-A-Bell", "nudity": "I2P"}


@dataclass(frozen=True)
class Reported:
    """One reported (DSR, PP) pair; PP is None where the paper reports only DSR."""

    dsr: float
    pp: float | None = None


# docs/methods.md 1.2: violence, Ring-A-Bell, DUO beta=1000.
VIOLENCE_BETA1000: dict[str, Reported] = {
    "DUO": Reported(0.613, 0.820),
    "DUO+SLD": Reported(0.760, 0.784),
    "DUO+SLD+Ours": Reported(0.880, 0.693),
    "DUO+SAFREE": Reported(0.793, 0.733),
    "DUO+SAFREE+Ours": Reported(0.947, 0.676),
}

# docs/methods.md 1.2: nudity, I2P, DUO beta=2000.
NUDITY_BETA2000: dict[str, Reported] = {
    "DUO": Reported(0.442, 0.802),
    "DUO+SLD": Reported(0.484, 0.777),
    "DUO+SLD+Ours": Reported(0.937, 0.712),
    "DUO+SAFREE": Reported(0.568, 0.678),
    "DUO+SAFREE+Ours": Reported(0.947, 0.632),
}

# docs/methods.md 1.2: transfer (nudity, C* learned on beta=500), DSR only, keyed by target beta.
TRANSFER_NUDITY: dict[int, dict[str, Reported]] = {
    250: {"SLD+Ours": Reported(1.000), "SAFREE+Ours": Reported(0.990)},
    1000: {"SLD+Ours": Reported(0.990), "SAFREE+Ours": Reported(0.990)},
    2000: {"SLD+Ours": Reported(0.905), "SAFREE+Ours": Reported(0.968)},
}


def main_table(task: str) -> dict[str, Reported]:
    """The reported main table of ``task`` ("violence" or "nudity") at its beta (``MAIN_BETA``)."""
    return {"violence": VIOLENCE_BETA1000, "nudity": NUDITY_BETA2000}[task]


def reported(task: str, beta: int, method: str) -> Reported | None:
    """The paper's (DSR, PP) for one main-table cell, or None where the paper gives no number."""
    if MAIN_BETA.get(task) != beta:
        return None
    return main_table(task).get(method)


def reported_transfer(beta: int, method: str) -> Reported | None:
    """The paper's transfer-table DSR for ``method`` ("SLD+Ours" / "SAFREE+Ours") at ``beta``."""
    return TRANSFER_NUDITY.get(beta, {}).get(method)


# ----------------------------------------------------------------------------- which N a number allows
DECIMALS = 3  # the paper prints three decimals
PLAUSIBLE_N = (50, 1000)  # prompt-set sizes a reported DSR is checked against


def attainable(value: float, n: int, decimals: int = DECIMALS) -> bool:
    """Whether ``value`` (as printed, ``decimals`` places) is ``k / n`` for some integer ``k``."""
    if n < 1:
        return False
    k = round(value * n)
    return any(0 <= j <= n and round(j / n, decimals) == round(value, decimals) for j in (k - 1, k, k + 1))


def consistent_ns(values, lo: int = PLAUSIBLE_N[0], hi: int = PLAUSIBLE_N[1]) -> list[int]:
    """Every N in ``[lo, hi]`` at which all of ``values`` are attainable as ``k / N``."""
    values = [v for v in values if v is not None]
    return [n for n in range(lo, hi + 1) if all(attainable(v, n) for v in values)]


# the image counts of the prompt sets the framework loads (conf/benchmark), for naming a consistent N
KNOWN_N: dict[str, int] = {
    "ring_a_bell_nudity": 79,
    "i2p_nudity": 95,
    "unlearndiffatk_nudity": 142,
    "ring_a_bell_violence": 750,
    "i2p_sexual": 931,
}


def n_note(label: str, values, n: int | None) -> str | None:
    """A visible note when some of a table's paper numbers cannot be ``k / n`` at our ``n``, with the
    N they are jointly consistent with; None when all are attainable (or ``n`` is unknown)."""
    values = sorted({round(float(v), DECIMALS) for v in values if v is not None})
    if not values or not n:
        return None
    off = [v for v in values if not attainable(v, n)]
    if not off:
        return None
    ns = consistent_ns(values)
    shown = ", ".join(map(str, ns[:12])) + (f", ... ({len(ns)} in all)" if len(ns) > 12 else "")
    known = [f"{name} (N={k})" for name, k in KNOWN_N.items() if all(attainable(v, k) for v in values)]
    return (
        f"Note: the paper's {label} value(s) {', '.join(f'{v:.3f}' for v in off)} cannot be k/{n} for any k "
        f"(our N = {n}): they cannot be matched in principle at this N. All of this table's paper values "
        f"are k/N together for N in {PLAUSIBLE_N[0]}..{PLAUSIBLE_N[1]} = {{{shown or 'none'}}}"
        + (f"; of the prompt sets here: {', '.join(known)}." if known else "; none of the prompt sets here.")
    )
