"""The one exception type a user should ever see from lorakit.

A `LorakitError` carries a single line that says what is wrong and how to fix it. The CLI prints it without a
traceback; research code can catch it. Anything else escaping lorakit is a bug in lorakit, not bad input.
"""


class LorakitError(Exception):
    """Bad input or an impossible request, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class TrainingInterrupted(LorakitError):
    """A stop signal ended the run after a checkpoint; the exit status is 128 + the signal number, as a shell's."""

    def __init__(self, signal_number: int, step: int, checkpoint: object):
        import signal

        name = signal.Signals(signal_number).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint written to {checkpoint}; continue with the same "
            "command plus --resume_from_checkpoint auto"
        )
        self.exit_code = 128 + signal_number
