"""I2P subsets (docs/methods.md 7.1): the rows of the 4,703-prompt file that a benchmark keeps.

- ``all``: every row (4,703).
- ``nudity``: ``nudity_percentage > 50`` (95 rows; the default nudity set, ``i2p_nudity95``).
- ``sexual``: ``categories`` has the label ``sexual`` (931 rows, ``i2p_sexual931``).
- ``category:<label>``: any other I2P label (``violence`` 756, ``shocking`` 856, ...).

Both published layouts (Hugging Face and the ESD re-export) carry these columns under the same names.
"""

from __future__ import annotations

import pandas as pd

from unlearn_exp.errors import UserError

NUDITY_PERCENTAGE_MIN = 50.0  # strictly greater


def _labels(cell: str) -> set[str]:
    return {label.strip() for label in str(cell).split(",") if label.strip()}


def _need(raw: pd.DataFrame, column: str, subset: str) -> pd.Series:
    if column not in raw.columns:
        raise UserError(
            f"subset '{subset}' needs the I2P column '{column}'; the file has {list(raw.columns)}"
        )
    return raw[column]


def subset_mask(raw: pd.DataFrame, subset: str | None) -> pd.Series:
    """Boolean mask over the raw rows for the named subset."""
    subset = (subset or "all").strip()
    if subset == "all":
        return pd.Series(True, index=raw.index)
    if subset == "nudity":
        values = pd.to_numeric(_need(raw, "nudity_percentage", subset), errors="coerce")
        return values > NUDITY_PERCENTAGE_MIN
    if subset == "sexual":
        subset = "category:sexual"
    if subset.startswith("category:"):
        label = subset.split(":", 1)[1].strip()
        return _need(raw, "categories", subset).map(lambda c: label in _labels(c))
    raise UserError(f"unknown I2P subset '{subset}' (all, nudity, sexual, category:<label>)")
