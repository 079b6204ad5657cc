"""Shared by the tests: the fixture folder, the one tiny config, reference outputs.

A module of its own (not conftest.py) so that `from fixture_support import ...`
means the same thing whichever conftest pytest happened to load last.
"""

import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# The one tiny architecture every test that needs "a model" shares:
# multi-query attention so the awkward sharding case is always exercised.
TINY_CONFIG = dict(vocabulary_size=256, num_layers=2, num_query_heads=4,
                   num_key_value_heads=1, hidden_dim=64, intermediate_dim=128,
                   head_dim=16)


def reference(name):
    return np.load(FIXTURES / name / "reference_outputs.npz")


def reference_inputs(name):
    ref = reference(name)
    return {"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]}
