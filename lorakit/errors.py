"""The one exception type a user should ever see from lorakit.

A `LorakitError` carries a single line that says what is wrong and how to fix it. The CLI prints it without a
traceback; research code can catch it. Anything else escaping lorakit is a bug in lorakit, not bad input.
"""


class LorakitError(Exception):
    """Bad input or an impossible request, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
