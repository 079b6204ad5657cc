"""Many token sequences as two arrays: cheap to pickle, store and send.

Training data can hold up to a million sequences. As a tuple of arrays it
costs seconds to pickle (Ray pickles a job's arguments on the caller's
thread, the coordinator's event loop) and numpy holds the GIL while it
concatenates them; packed, it is two arrays whatever the count.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence

import numpy as np

# Sequences concatenated per numpy call while packing: numpy holds the GIL
# for a whole call, and one call over a million small arrays would stall
# every other thread (the event loop too) for a large part of a second.
_PACK_GROUP = 4096


class PackedSequences(Sequence):
    """int32 token sequences, concatenated (`ids`) with where each starts
    (`offsets`, one more than there are sequences). Indexing gives views.

    Example:
    >>> packed = PackedSequences.pack([np.array([1, 2]), np.array([3, 4, 5])])
    >>> len(packed), packed[1].tolist(), packed.num_tokens
    (2, [3, 4, 5], 5)
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids = np.asarray(ids, "int32")
        self.offsets = np.asarray(offsets, "int64")
        if (self.offsets.ndim != 1 or not self.offsets.size or self.offsets[0] != 0
                or self.offsets[-1] != self.ids.size or np.any(np.diff(self.offsets) < 0)):
            raise ValueError("offsets must rise from 0 to the number of ids.")

    @classmethod
    def pack(cls, sequences: Iterable[np.ndarray]) -> "PackedSequences":
        """Packs `sequences` (consumed once, so a generator works)."""
        ids, lengths, group = [np.zeros(0, "int32")], [np.zeros(0, "int64")], []
        for sequence in itertools.chain(sequences, [None]):
            if sequence is not None:
                group.append(np.asarray(sequence, "int32").reshape(-1))
            if len(group) == _PACK_GROUP or (sequence is None and group):
                ids.append(np.concatenate(group))
                lengths.append(np.array([part.size for part in group], "int64"))
                group = []
        return cls(np.concatenate(ids), np.concatenate([[0], np.cumsum(np.concatenate(lengths))]))

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, index) -> np.ndarray:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} of {len(self)}")
        return self.ids[self.offsets[index]:self.offsets[index + 1]]
