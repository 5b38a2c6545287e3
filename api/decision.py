"""The margin decision: what the processor must do, from the image header alone."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Decision:
    scale: bool
    grayscale: bool


def within_margin(size: tuple[int, int], target: tuple[int, int], margin: float) -> bool:
    """True when both sides differ from the target by at most ``margin`` of the target.

    Exact arithmetic: 1050 against 1000 at 0.05 is inside, 1051 is not.
    """
    num, den = _ratio(margin)
    return all(abs(s - t) * den <= num * t for s, t in zip(size, target, strict=True))


@functools.cache
def _ratio(margin: float) -> tuple[int, int]:
    """The margin as written (0.05 is 1/20, not the float's binary value), as integers: the
    per-request check is then integer arithmetic (1.5 us, was 22 us with Fractions)."""
    exact = Fraction(str(margin))
    return exact.numerator, exact.denominator


def decide(
    oriented_size: tuple[int, int], target: tuple[int, int], margin: float, grayscale: bool
) -> Decision:
    """Scale unless the (EXIF-oriented) size is within the margin; grayscale as configured.

    When neither is needed the processor still strips metadata (losslessly for JPEG).
    """
    return Decision(scale=not within_margin(oriented_size, target, margin), grayscale=grayscale)
