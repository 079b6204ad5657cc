"""Layer indices: one rule for the library and the service."""

import numpy as np
import pytest

from gemma_core import LayerIndexError, normalize_layer_index, normalize_layers


@pytest.mark.parametrize("index, expected", [(0, 0), (3, 3), (4, 4), (-1, 4), (-5, 0),
                                             (np.int32(-2), 3)])
def test_indices_in_range_map_to_0_through_L(index, expected):
    assert normalize_layer_index(index, num_layers=4) == expected
    assert type(normalize_layer_index(index, num_layers=4)) is int


@pytest.mark.parametrize("index", [5, -6, 2**31 - 1, -2**31])
def test_indices_out_of_range_say_the_range(index):
    with pytest.raises(LayerIndexError) as raised:
        normalize_layer_index(index, num_layers=4)
    assert str(raised.value) == (f"Layer index {index} is out of range for a 4-layer model; "
                                 "use 0..4 or -5..-1.")
    assert raised.value.reason == (f"{index} is out of range for a 4-layer model; "
                                   "use 0..4 or -5..-1.")
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("index", [True, 1.0, "1", None])
def test_non_integers_are_refused(index):
    with pytest.raises(LayerIndexError, match="must be integers"):
        normalize_layer_index(index, num_layers=4)


def test_a_list_keeps_order_and_repeats():
    assert normalize_layers([-1, 0, 2, 2], num_layers=2) == [2, 0, 2, 2]
