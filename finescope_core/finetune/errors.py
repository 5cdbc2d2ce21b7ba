"""The error of the tuning stage."""


class FinetuneError(ValueError):
    """Fine-tuning cannot start with these inputs; the message names the input and the fix."""
