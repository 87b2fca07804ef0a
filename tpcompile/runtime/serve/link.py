"""The front process's end of the socket to rank 0 (:class:`RankLink`).

Rank 0 connects once; a reader thread turns its messages into calls of each open request's *sink* (a
callable given with the request, called on the reader thread with each :class:`~.protocol.Event`, or with
a :class:`Failure` when the ranks are gone).

Invariants: a request's sink is called for each of its events in order and then forgotten after its
finishing event or a failure, whichever comes first; after :meth:`RankLink.fail` (the ranks exited, or the
socket closed) every open request has had its failure and every later submit fails at once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .protocol import Command, Event, Op, SubmitParams, command, line, parse_events

__all__ = ["Failure", "RankLink", "Sink"]


@dataclass(frozen=True)
class Failure:
    """The ranks cannot answer (``reason`` says why): the request ends with a 503."""

    reason: str


Sink = Callable[[Event | Failure], None]


class RankLink:
    """Listens on ``path`` for rank 0, then forwards commands and dispatches events."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.ready = threading.Event()
        self.closed = threading.Event()  # rank 0's side of the socket is closed, every event was read
        self.slots = 0
        self.failure: str | None = None
        self._conn: socket.socket | None = None
        self._sinks: dict[int, Sink] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="rank-link", daemon=True).start()

    @property
    def open_requests(self) -> int:
        """Requests submitted and not finished yet (waiting for a slot or running)."""
        with self._lock:
            return len(self._sinks)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.closed.set()
            return  # closed before rank 0 connected: fail() already ran
        self._conn = conn
        with conn.makefile("rb") as stream:
            for raw in stream:
                data = json.loads(raw)
                if "ready" in data:
                    self.slots = int(data["ready"]["slots"])
                    self.ready.set()
                    continue
                for event in parse_events(data):
                    with self._lock:
                        sink = self._sinks.get(event.request)
                        if event.finish is not None:
                            self._sinks.pop(event.request, None)
                    if sink is not None:
                        sink(event)
        self.closed.set()
        self.fail("the ranks stopped")

    def _send(self, cmd: Command) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionError("the ranks are not connected")
        with self._lock:
            conn.sendall(line(command(cmd)))

    def submit(self, request: int, params: SubmitParams, sink: Sink) -> None:
        """Queue a request on the ranks; its events go to ``sink``."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._sinks[request] = sink
        if failure is not None:
            sink(Failure(failure))
            return
        try:
            self._send(Command(Op.SUBMIT, request, params))
        except OSError as exc:
            self.fail(f"lost the ranks: {exc}")

    def cancel(self, request: int) -> None:
        """Ask the ranks to end ``request`` (its slot is free at their next step)."""
        with self._lock:
            known = self._sinks.pop(request, None) is not None
        if known:
            self._try(Command(Op.CANCEL, request))

    def drain(self) -> None:
        """Ask the ranks to finish what runs and exit."""
        self._try(Command(Op.DRAIN))

    def stop(self) -> None:
        """Ask the ranks to cancel everything and exit."""
        self._try(Command(Op.STOP))

    def _try(self, cmd: Command) -> None:
        with contextlib.suppress(OSError):  # the ranks are gone: the reader (or the launcher) says so
            self._send(cmd)

    def fail(self, reason: str) -> None:
        """The ranks are gone: every open request gets a :class:`Failure`, and so will later ones."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            sink(Failure(reason))
        self.listener.close()
