"""phi over arrays, and the time at which a detector can first be convicted (docs/design.md §2.3).

The scalar `core.detector.phi_from` is the definition. Here the same formula runs over numpy
arrays, with the same operations in the same order; numpy's `exp` and `log10` may differ from the
C library's by an ulp, so every decision whose vectorised phi lies within `BORDER` of the threshold
is taken again with `phi_from`. Decisions (failed or not, interval appended or skipped) are
therefore the reference's exactly; phi values agree to about 1e-15 relative.

phi depends on a heartbeat's lateness only through y = (diff - mean) / std, and grows with y: the
logistic approximation gives p = 1 / (1 + exp(g(y))) with g(y) = 1.5976 y + 0.070566 y^3, and
phi = -log10(p). So phi reaches a threshold T exactly when y reaches the root y* of
g(y) = ln(10^T - 1), whatever the detector's history. `safe_y(T)` is y* less a margin far larger
than any rounding, so `diff < mean + safe_y * std` proves phi < T without computing it: the table
keeps, per detector, the first millisecond at which that proof fails (its *due* time), and
computes phi only for detectors at or past it.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from supervisor_service.core.detector import phi_from

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

BORDER = 1e-6
"""A vectorised phi this close to the threshold (relative, at least absolute) is recomputed by the reference."""

# Past g = ln(2^1022) (about 708.4) p is a subnormal double: its few significant bits make phi jump
# (and past about 745.1 exp(-g) underflows to 0: phi is +inf). The bound stops below that range, so
# a threshold above about 304 is treated as one of 304: convictions are still exact (phi is then
# computed for each detector past due), only the due time is earlier than it could be.
_G_UNDERFLOW = 700.0


def _g(y: float) -> float:
    return y * (1.5976 + 0.070566 * y * y)


def safe_y(threshold: float) -> float:
    """A y below which phi is certainly under `threshold` (the root of g(y) = ln(10^T - 1), less a margin)."""
    t = threshold * math.log(10.0)
    target = math.log(math.expm1(t)) if t < 700.0 else t + math.log1p(-math.exp(-t))
    target = min(target, _G_UNDERFLOW)
    lo, hi = -60.0, 60.0  # g(±60) = ±15,337: far beyond any target
    for _ in range(200):  # bisection: g is strictly increasing
        mid = (lo + hi) / 2
        if _g(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo - 1e-6 * max(1.0, abs(lo)) - 1e-9


def phi_array(diff: Floats, mean: Floats, std: Floats) -> Floats:
    """`phi_from` elementwise (same operations; `exp`/`log10` are numpy's)."""
    y = (diff - mean) / std
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        e = np.exp(-y * (1.5976 + 0.070566 * y * y))
        p = np.where(diff > mean, e / (1.0 + e), 1.0 - 1.0 / (1.0 + e))
        phi: Floats = np.where(p == 0.0, np.inf, -np.log10(p) + 0.0)
    phi[np.isinf(e)] = 0.0  # where math.exp overflows the reference returns 0
    return phi


def at_or_above(diff: Floats, mean: Floats, std: Floats, threshold: float) -> Bools:
    """phi >= threshold elementwise, exactly as `phi_from` decides it."""
    phi = phi_array(diff, mean, std)
    decided: Bools = phi >= threshold
    near = np.flatnonzero(np.abs(phi - threshold) <= BORDER * max(1.0, threshold))
    for i in near.tolist():
        decided[i] = phi_from(float(diff[i]), float(mean[i]), float(std[i])) >= threshold
    return decided
