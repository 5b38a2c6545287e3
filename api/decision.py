"""The margin decision: what the processor must do, from the image header alone."""

from __future__ import annotations

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
    allowed = Fraction(str(margin))
    return all(abs(Fraction(s - t)) <= allowed * t for s, t in zip(size, target, strict=True))


def decide(
    oriented_size: tuple[int, int], target: tuple[int, int], margin: float, grayscale: bool
) -> Decision:
    """Scale unless the (EXIF-oriented) size is within the margin; grayscale as configured.

    When neither is needed the processor still strips metadata (losslessly for JPEG).
    """
    return Decision(scale=not within_margin(oriented_size, target, margin), grayscale=grayscale)
