"""Background processes for the Slicer module: an injectable runner.

The module Logic runs the Lib's prediction command line (``python -m
StrokePredictorLib.predict``) in a separate process, so Slicer stays responsive and a Cancel
can kill it. How a process is started and how its output reaches the main thread differs
between the Slicer application (Qt event loop) and a headless test (no Qt), so the Logic takes
a :class:`ProcessRunner`:

* :class:`SlicerProcessRunner` uses ``slicer.util.launchConsoleProcess(blocking=False)``, which
  polls the process with a ``qt.QTimer`` and calls back on the main thread;
* :class:`SubprocessRunner` uses a plain :mod:`subprocess` and a reader thread; its callbacks
  run on whichever thread calls :meth:`ProcessHandle.wait` (the caller's, as in Slicer), never
  on the reader thread, so MRML is only touched from one thread.

Both parse nothing: they deliver raw output lines and the exit code. This file imports no Qt.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

LineCallback = Callable[[str], None]
FinishedCallback = Callable[[int], None]


class ProcessHandle(Protocol):
    """A started process."""

    def is_running(self) -> bool:
        """True until the finished callback has been called."""

    def cancel(self) -> None:
        """Kill the process; the finished callback is still called (with a non-zero code)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Deliver pending callbacks until the process has finished or ``timeout`` seconds have
        passed; return True when finished."""


class ProcessRunner(Protocol):
    """Starts a process and reports its output lines and exit code through callbacks."""

    def start(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        on_line: LineCallback,
        on_finished: FinishedCallback,
    ) -> ProcessHandle:
        """Start ``args``; stdout and stderr lines go to ``on_line`` (merged, in order of
        arrival, without the trailing newline) and the exit code to ``on_finished``."""


class _SubprocessHandle:
    def __init__(self, process: subprocess.Popen, on_line: LineCallback, on_finished: FinishedCallback) -> None:
        self._process = process
        self._on_line = on_line
        self._on_finished = on_finished
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._finished = False
        self._reader = threading.Thread(target=self._read, name="StrokePredictor-process-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._events.put(("line", line.rstrip("\r\n")))
        self._events.put(("exit", self._process.wait()))

    def is_running(self) -> bool:
        return not self._finished

    def cancel(self) -> None:
        if self._process.poll() is None:
            self._process.kill()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                kind, payload = self._events.get(timeout=remaining if remaining is not None else 0.5)
            except queue.Empty:
                continue
            if kind == "line":
                self._on_line(str(payload))
            else:
                self._finished = True
                self._on_finished(int(payload))  # type: ignore[arg-type]
        return True


class SubprocessRunner:
    """Runs processes with :mod:`subprocess` (headless use and CI).

    Callbacks are delivered from :meth:`ProcessHandle.wait`, on the calling thread.
    """

    def start(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        on_line: LineCallback,
        on_finished: FinishedCallback,
    ) -> ProcessHandle:
        process = subprocess.Popen(
            list(args), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )
        return _SubprocessHandle(process, on_line, on_finished)


class _SlicerHandle:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.finished = False

    def is_running(self) -> bool:
        return not self.finished

    def cancel(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def wait(self, timeout: float | None = None) -> bool:
        import slicer

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            slicer.app.processEvents()
            time.sleep(0.02)
        return True


class SlicerProcessRunner:
    """Runs processes with ``slicer.util.launchConsoleProcess(blocking=False)`` (Slicer 5.12+);
    output and completion arrive on the main thread through Slicer's ``qt.QTimer`` polling."""

    def start(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        on_line: LineCallback,
        on_finished: FinishedCallback,
    ) -> ProcessHandle:
        import slicer

        handle = _SlicerHandle()

        def finished(code: int) -> None:
            handle.finished = True
            on_finished(int(code))

        extra = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        handle.process = slicer.util.launchConsoleProcess(
            list(args), useStartupEnvironment=True, updateEnvironment=extra or None, cwd=cwd,
            blocking=False, logCallback=lambda line: on_line(line.rstrip("\r\n")), completedCallback=finished,
        )
        return handle
