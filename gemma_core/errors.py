"""Errors a user of gemma_core can cause, each saying what to fix."""


class PresetError(ValueError):
    """A preset cannot be found, downloaded, parsed or matched to its weights."""


class TokenIdError(ValueError):
    """Token ids outside [0, vocabulary_size) or inputs of the wrong form."""


class AdapterMismatch(ValueError):
    """A LoRA adapter does not fit the base model (made for another one) or
    its factors are malformed."""
