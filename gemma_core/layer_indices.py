"""Layer indices as Hugging Face's `output_hidden_states` counts them.

For a model of L decoder blocks, index 0 is the scaled embedding, i in
1..L-1 the output of block i-1, and L the backbone output (last block, then
the final norm). Negative indices count from the end, as in Python: -1 is
L and -(L+1) is 0. The library and the service both accept indices in this
form, so the rule lives here once.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class LayerIndexError(ValueError):
    """A layer index that is not an integer in [-(L+1), L].

    Attributes:
        reason: the message without its "Layer index" subject, for callers
            that name the index their own way (the service says `layers[2]`).
    """

    def __init__(self, subject: str, reason: str):
        super().__init__(f"{subject} {reason}")
        self.reason = reason


def normalize_layer_index(index, num_layers: int) -> int:
    """Maps an index in [-(L+1), L] to [0, L], L being `num_layers`.

    Raises:
        LayerIndexError: `index` is not an integer, or is out of range.

    Example:
    >>> normalize_layer_index(-1, num_layers=4)
    4
    """
    L = num_layers
    # bool is an int to Python, but True as a layer index is a mistake.
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise LayerIndexError("Layer indices", f"must be integers, got {index!r}.")
    if not -(L + 1) <= index <= L:
        raise LayerIndexError("Layer index", f"{index} is out of range for a {L}-layer "
                                             f"model; use 0..{L} or -{L + 1}..-1.")
    return int(index) % (L + 1)


def normalize_layers(layers: Iterable, num_layers: int) -> list[int]:
    """`normalize_layer_index` of each index, in order, repeats kept."""
    return [normalize_layer_index(index, num_layers) for index in layers]
