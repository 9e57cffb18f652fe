"""SIGTERM in the driver: `ray job stop` sends it, and the registry records the job as STOPPED
(see JobRegistry.tracking) whatever exception the signal ended up as."""

from __future__ import annotations

import os
import signal
import threading


class JobStopped(BaseException):
    """Raised in the driver's main thread when it receives SIGTERM (what `ray job stop` sends)."""


class SigtermWatch:
    """Whether SIGTERM arrived while it was open, whatever exception that ended up as.

    It installs a handler raising JobStopped (so cleanup code runs), but `ray.init` replaces that
    with its own `sys.exit(SIGTERM)`, which a `ray.get` in progress turns into `SystemExit(1)`. So
    the arrival itself is recorded through the signal wakeup fd, which Python writes for every
    signal with a Python-level handler, whichever handler that is. Main thread only (elsewhere
    it watches nothing and `received()` is False)."""

    def __init__(self):
        self._active = threading.current_thread() is threading.main_thread()
        if not self._active:
            return
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous_handler = signal.signal(signal.SIGTERM, self._raise_stopped)

    @staticmethod
    def _raise_stopped(signum, frame):
        raise JobStopped(f"signal {signum}")

    def received(self) -> bool:
        if not self._active:
            return False
        try:
            return signal.SIGTERM in os.read(self._read_fd, 4096)
        except BlockingIOError:  # nothing arrived
            return False

    def close(self) -> None:
        if not self._active:
            return
        signal.signal(signal.SIGTERM, self._previous_handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
        self._active = False
