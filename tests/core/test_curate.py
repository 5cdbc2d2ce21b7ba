"""Tests for finescope_core.curate: which layers a curation hooks."""

from __future__ import annotations

import pytest

from finescope_core.config import CurateConfig
from finescope_core.curate import hooked_layers
from finescope_core.hooks import LayerSelectionError


def test_hooked_layers_default_spacing_skips_the_first_layers() -> None:
    assert hooked_layers(12, CurateConfig(num_layers=4)) == [2, 5, 8, 11]
    assert hooked_layers(3, CurateConfig()) == [0, 1, 2]  # fewer layers than asked: all of them


def test_hooked_layers_resolves_configured_layers_ascending() -> None:
    assert hooked_layers(6, CurateConfig(layers=[-1, 0, 3])) == [0, 3, 5]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([-1, 5], r"curate\.layers \[-1, 5\] names decoder layer 5 twice \(as -1 and 5\); list each layer once"),
        ([2, 2], r"curate\.layers \[2, 2\] names decoder layer 2 twice"),
        ([0, 6], r"curate\.layers contains 6, which is out of range: the model has 6 layers \(valid: 0\.\.5"),
        ([], r"no layers requested in curate\.layers"),
    ],
)
def test_hooked_layers_refuses_a_layer_set_that_a_typo_would_change(layers: list[int], message: str) -> None:
    """A repeated layer is an error, not silently dropped: the set of hooked layers is what the user wrote."""
    with pytest.raises(LayerSelectionError, match=message):
        hooked_layers(6, CurateConfig(layers=layers))
