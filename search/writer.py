"""One thread that delivers the driver's MLflow writes in order, so Tune's loop never waits for the server."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException

Write = Callable[[], Any]


class OrderedWriter:
    """Runs writes one at a time, in the order given, on a daemon thread of its own.

    A write that fails because the server is unreachable (an MLflow or OS error) stays first in line and is tried
    again every ``retry_every_s``; the writes behind it wait, so the server sees them in the order they were made.
    The console hears once when the server goes away and once when what waited is delivered. Writes still waiting
    when the process ends are lost, as they were when the driver wrote them itself: a resumed driver delivers them.
    Any other error of a write (a bug) ends the thread and is raised again in the caller's next call, as it was
    raised in Tune's loop when the loop made the writes itself.
    """

    def __init__(self, retry_every_s: float) -> None:
        self._retry_every_s = retry_every_s
        self._waiting: deque[Write] = deque()
        self._changed = threading.Condition()
        self._busy = False  # a write is running or waiting to be tried again
        self._down_since: float | None = None
        self._catching_up = False  # the server answers again and the writes that waited are going out
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def put(self, *writes: Write) -> None:
        with self._changed:
            self._raise_failure()
            self._waiting.extend(writes)
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="dettune-mlflow", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def down_for(self) -> float:
        """Seconds since the server stopped answering; 0 while it answers."""
        with self._changed:
            self._raise_failure()
            return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def wait_delivered(self, timeout_s: float) -> bool:
        """Waits until every write made so far is delivered, or ``timeout_s``; whether they all were."""
        with self._changed:
            delivered = self._changed.wait_for(
                lambda: self._failure is not None or (not self._waiting and not self._busy), timeout_s)
            self._raise_failure()
            return delivered

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _deliver(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._waiting))
                write, self._busy = self._waiting[0], True
            if self._attempt(write):
                with self._changed:
                    self._waiting.popleft()
                    self._busy = False
                    self._changed.notify_all()
            elif self._failure is not None:
                return
            else:
                time.sleep(self._retry_every_s)

    def _attempt(self, write: Write) -> bool:
        try:
            write()
        except BaseException as exc:
            if not isinstance(exc, MlflowException | OSError):
                with self._changed:
                    self._failure = exc
                    self._changed.notify_all()
                return False
            with self._changed:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"[{time.strftime('%H:%M:%S')}] MLflow unreachable, buffering its writes: {exc}", flush=True)
            return False
        with self._changed:
            if self._down_since is not None:  # it answers again: what waited goes out now
                self._down_since, self._catching_up = None, True
            if self._catching_up and len(self._waiting) == 1:
                print(f"[{time.strftime('%H:%M:%S')}] MLflow is back; buffered writes delivered", flush=True)
                self._catching_up = False
        return True
