"""Errors a user of gemma_core can cause, each saying what to fix."""


class PresetError(ValueError):
    """A preset cannot be found, downloaded, parsed or matched to its weights."""


class TokenIdError(ValueError):
    """Token ids outside [0, vocabulary_size) or inputs of the wrong form."""


class AdapterMismatch(ValueError):
    """A LoRA adapter does not fit the base model (made for another one) or
    its factors are malformed."""


class MalformedAdapter(AdapterMismatch):
    """The adapter is wrong in itself, whatever model it is meant for: a rank
    or alpha that is not a positive number, factors that do not pair up,
    NaN or infinite values, tensors of the wrong names or element types."""


class UnsupportedAdapter(AdapterMismatch):
    """The adapter asks for something other than plain LoRA on the seven
    projections gemma_core computes (a PEFT setting such as DoRA, biases,
    extra trained modules or LoRA on the embedding); the message names the
    setting."""
