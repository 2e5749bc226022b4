"""Statistics shared by training (early stopping) and evaluation, so both measure agreement the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def spearman(y_true: Sequence[float], y_pred: Sequence[float], undefined: float = math.nan) -> float:
    """Spearman's rho; ``undefined`` (NaN unless told) when either side is constant or has fewer than 2 values.

    Evaluation reports NaN (shown as null); early stopping passes -1, so an undefined value never wins.
    """
    from scipy.stats import spearmanr

    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        return undefined
    value = float(spearmanr(t, p).statistic)
    return value if math.isfinite(value) else undefined
