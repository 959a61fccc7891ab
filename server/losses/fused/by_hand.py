"""What the hand-written kernels (``focal_triton``, ``gfocal_triton``) share: Triton device functions.

This module imports Triton: only those kernels import it, and the engine loads them on a GPU only
(``compiled.OnePass``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def power_and_derivative(base, exponent, squared: tl.constexpr):
    """``base^e`` and ``d(base^e)/d(base)`` for ``base >= 0``, with torch's values at 0 (``0^0 = 1``; the
    derivative 1 there for ``e = 1``, 0 for ``e = 0``: the fused kernels take ``e = 0`` or ``e >= 1``
    only, where it is finite, ``supported_exponent``). ``squared``: ``e`` is 2, known on the host (mmdet's
    default for gamma and beta), by multiplies instead of ``exp2(e log2 base)``."""
    if squared:
        power = base * base
        derivative = 2.0 * base
    else:
        log_base = tl.log2(base)
        power = tl.where(base > 0.0, tl.exp2(exponent * log_base), tl.where(exponent == 0.0, 1.0, 0.0))
        derivative = tl.where(
            base > 0.0, exponent * tl.exp2((exponent - 1.0) * log_base), tl.where(exponent == 1.0, 1.0, 0.0)
        )
        derivative = tl.where(exponent == 0.0, 0.0, derivative)
    return power, derivative
