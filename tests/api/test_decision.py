from __future__ import annotations

import pytest

from api.decision import decide, within_margin

TARGET = (1000, 1000)


@pytest.mark.parametrize(
    ("size", "inside"),
    [
        ((1000, 1000), True),
        ((1049, 951), True),  # 4.9% on both sides
        ((1050, 950), True),  # exactly 5%: inside
        ((1051, 1000), False),  # 5.1% wide
        ((1000, 949), False),  # 5.1% short
        ((1000, 1200), False),  # one in, one out
        ((500, 1000), False),
    ],
)
def test_margin_boundaries_are_exact(size: tuple[int, int], inside: bool) -> None:
    assert within_margin(size, TARGET, 0.05) is inside


def test_default_target_example_from_the_issue() -> None:
    assert within_margin((1000, 760), (1024, 768), 0.05)
    assert not within_margin((768, 1024), (1024, 768), 0.05)


def test_rotated_exif_dimensions_decide() -> None:
    """A 768x1024 portrait stored sideways (EXIF 6) is 1024x768 upright: no scaling."""
    stored = (768, 1024)
    oriented = (stored[1], stored[0])
    assert decide(oriented, (1024, 768), 0.05, True).scale is False
    assert decide(stored, (1024, 768), 0.05, True).scale is True


def test_zero_margin_means_exact_size_only() -> None:
    assert within_margin((1024, 768), (1024, 768), 0.0)
    assert not within_margin((1025, 768), (1024, 768), 0.0)


@pytest.mark.parametrize("grayscale", [True, False])
def test_grayscale_follows_configuration(grayscale: bool) -> None:
    assert decide((4032, 3024), (1024, 768), 0.05, grayscale).grayscale is grayscale
