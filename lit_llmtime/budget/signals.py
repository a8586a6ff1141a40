"""Ctrl-C (SIGINT) and SIGTERM: keep every paid step, then exit 130 or 143 as the shell expects.

During training the handler only notes the signal: no I/O and no collective inside a signal
handler (Lightning's own SIGTERM handler broadcasts there, which hangs the other ranks of a DDP
run when only one is signalled). The FLOP budget carries the note in the all-reduce it makes
before every training batch, so every rank sees it at the same batch, saves the last completed
step and raises ``Interrupted``. Outside training there is nothing to save: the signal raises at
once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal; ``exit_code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int, saved: str | None = None) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (f"; {saved}" if saved else "; nothing to save"))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Once installed, SIGINT and SIGTERM are noted (``received``), or with ``immediate`` raise
    ``Interrupted`` where the program is. Install it from a Trainer hook: the Trainer's teardown
    puts back the handlers it found before it registered its own."""

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self, immediate: bool = False) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._raise if immediate else self._note)

    def flags(self) -> list[float]:
        """``[SIGINT received, SIGTERM received]`` as numbers, to sum over ranks."""
        return [float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM)]

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT == signum:  # Ctrl-C twice: quit now, unsaved
            raise Interrupted(signum, "pressed twice: the step in progress was not saved")
        self.received = self.received or signum

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        raise Interrupted(signum)


def first_signal(flags: list[float]) -> int | None:
    """The signal a (summed) ``StopSignals.flags`` stands for: SIGINT if any rank got one."""
    if flags[0]:
        return signal.SIGINT
    return signal.SIGTERM if flags[1] else None
