"""Background processes for the Slicer module: an injectable runner that can kill a whole tree.

The module Logic runs the Lib's prediction command line (``python -m
StrokePredictorLib.predict``) in a separate process, so Slicer stays responsive and Cancel can
stop it. In Slicer that command is ``PythonSlicer``, a launcher (CTK AppLauncher) that sets up
the environment and starts the real Python as its child: killing the launcher alone leaves the
computation running. So :class:`SubprocessRunner` starts every process in a process group of
its own (a new session on Linux and macOS, ``CREATE_NEW_PROCESS_GROUP`` on Windows) and Cancel
ends the whole group (``os.killpg`` / ``taskkill /T /F``).

It uses no Slicer API that changed between Slicer versions (``launchConsoleProcess`` gained
its non-blocking arguments only in 5.12): the process is started with :mod:`subprocess`, its
output is read by a thread into a queue, and the callbacks are delivered on the thread that
polls, never on the reader thread, so MRML is only touched from one thread. Who polls is
injected: in Slicer a ``qt.QTimer`` (``schedule``, see ``StrokePredictor.qtSchedule``), in
batch use and CI the caller of :meth:`ProcessHandle.wait`.

This file imports no Qt and no Slicer.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

LineCallback = Callable[[str], None]
FinishedCallback = Callable[[int], None]
# schedule(poll, interval_ms) starts calling ``poll`` every ``interval_ms`` on the main thread
# and returns a function that stops it.
Schedule = Callable[[Callable[[], None], int], Callable[[], None]]

POLL_INTERVAL_MS = 100


class ProcessHandle(Protocol):
    """A started process."""

    def is_running(self) -> bool:
        """True until the finished callback has been called."""

    def cancel(self) -> None:
        """Kill the process and every process it started; the finished callback is still
        called (with a non-zero code)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Deliver pending callbacks until the process has finished or ``timeout`` seconds have
        passed; return True when finished."""


class ProcessRunner(Protocol):
    """Starts a process and reports its output lines and exit code through callbacks."""

    def start(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | None,
        on_line: LineCallback,
        on_finished: FinishedCallback,
    ) -> ProcessHandle:
        """Start ``args`` with ``env`` set on top of the runner's base environment; stdout and
        stderr lines go to ``on_line`` (merged, in order of arrival, without the trailing
        newline) and the exit code to ``on_finished``."""


def merge_environment(base: Mapping[str, str], update: Mapping[str, str] | None) -> dict[str, str]:
    """``base`` with ``update`` applied; ``PYTHONPATH`` entries are put in front of the base's."""
    merged = {str(k): str(v) for k, v in base.items() if k}
    for key, value in (update or {}).items():
        if key == "PYTHONPATH" and merged.get(key):
            merged[key] = os.pathsep.join([value, merged[key]])
        else:
            merged[key] = value
    return merged


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started.

    The process must have been started by :class:`SubprocessRunner` (its own process group /
    session). On Windows ``taskkill /T /F`` ends the tree; on Linux and macOS SIGKILL goes to the
    whole process group, which also reaches children whose parent has already exited.
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        if process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if process.poll() is None:
            process.kill()


class _ProcessHandle:
    def __init__(self, process: subprocess.Popen, on_line: LineCallback, on_finished: FinishedCallback,
                 schedule: Schedule | None, interval_ms: int) -> None:
        self.process = process
        self._on_line = on_line
        self._on_finished = on_finished
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._finished = False
        self._delivering = False
        self._reader = threading.Thread(target=self._read, name="StrokePredictor-process-reader", daemon=True)
        self._reader.start()
        self._stop_schedule: Callable[[], None] | None = None
        if schedule is not None:
            self._stop_schedule = schedule(self.poll, interval_ms)

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                self._events.put(("line", line.rstrip("\r\n")))
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        self._events.put(("exit", self.process.wait()))

    def is_running(self) -> bool:
        return not self._finished

    def cancel(self) -> None:
        if not self._finished:
            kill_process_tree(self.process)

    def poll(self, block_s: float = 0.0) -> None:
        """Deliver the callbacks of everything that arrived (waiting up to ``block_s`` for the
        first event). Re-entrant calls (a callback that runs an event loop) return at once."""
        if self._finished or self._delivering:
            return
        self._delivering = True
        try:
            first = True
            while not self._finished:
                try:
                    kind, payload = self._events.get(timeout=block_s) if first and block_s > 0 \
                        else self._events.get_nowait()
                except queue.Empty:
                    return
                first = False
                if kind == "line":
                    self._on_line(str(payload))
                else:
                    self._finished = True
                    if self._stop_schedule is not None:
                        # Stop, but keep the reference: dropping it here could delete the timer
                        # from inside its own timeout signal.
                        self._stop_schedule()
                    self._on_finished(int(payload))  # type: ignore[arg-type]
        finally:
            self._delivering = False

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            remaining = 0.2 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.poll(block_s=min(remaining, 0.2))
        return True


class SubprocessRunner:
    """Runs processes with :mod:`subprocess`, each in a process group of its own.

    Args:
        schedule: ``schedule(poll, interval_ms) -> stop``; when given, output and completion are
            delivered by ``poll`` as the scheduler calls it (in Slicer: a ``qt.QTimer`` on the
            main thread). Without it, callbacks arrive from :meth:`ProcessHandle.wait`.
        base_environment: returns the environment the process starts from (in Slicer:
            ``slicer.util.startupEnvironment()``, the environment before the launcher changed
            it, so that ``PythonSlicer`` sets it up afresh); default: this process's.
        interval_ms: how often ``schedule`` polls.
    """

    def __init__(self, schedule: Schedule | None = None,
                 base_environment: Callable[[], Mapping[str, str]] | None = None,
                 interval_ms: int = POLL_INTERVAL_MS) -> None:
        self.schedule = schedule
        self.base_environment = base_environment
        self.interval_ms = int(interval_ms)

    def start(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | None,
        on_line: LineCallback,
        on_finished: FinishedCallback,
    ) -> ProcessHandle:
        base = self.base_environment() if self.base_environment is not None else os.environ
        options: dict = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # no console window
            info.wShowWindow = 0
            options["startupinfo"] = info
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True
        process = subprocess.Popen(
            list(args), env=merge_environment(base, env), cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
            bufsize=1, **options,
        )
        return _ProcessHandle(process, on_line, on_finished, self.schedule, self.interval_ms)

