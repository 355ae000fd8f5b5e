"""SIGTERM (cluster preemption) and SIGINT (Ctrl-C) become a request to stop after the current optimizer step.

The handler only records the signal; the loop shares it with the other ranks after every step, so all ranks
finish the same step, write one checkpoint together and exit. A second signal while stopping interrupts at
once, for when the checkpoint itself hangs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received = 0  # the signal number, 0 while none arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt(f"second {signal.Signals(number).name} while stopping")
        self.received = number

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread handle signals
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
