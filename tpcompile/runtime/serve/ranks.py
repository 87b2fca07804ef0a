"""What every rank of ``tprun serve`` runs: the continuous-batching loop over one shared schedule.

Rank 0 holds the connection to the front process (:class:`FrontConnection`). At every step it takes the
commands that arrived (waiting up to :data:`IDLE_TICK_S` when nothing runs), and all ranks receive that
list (:func:`share_commands`: its length through the same-host transport, the bytes only when there are
any) and apply it to identical schedulers, so every rank then runs the same program calls and chooses the
same tokens; rank 0 sends the step's events back to the front.

Invariants:
- the ranks meet at least every :data:`IDLE_TICK_S` seconds, even idle, so a dead or stopped rank is
  noticed within the collective timeout (the peer's collective fails, the rank exits non-zero and the
  launcher stops the others);
- ``drain`` takes no new request and returns once the running ones finished; ``stop`` (or the front going
  away) cancels everything and returns; both exit 0.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import PromptError
from ..lm.batch import BatchEngine
from ..lm.generate import CausalLM
from ..lm.options import SamplingConfig
from ..lm.scheduler import Finish, Request, Scheduler, TokenEvent
from ..load.program import RankProgram
from ..reporting import EXIT_OK
from ..transport.collectives import all_gather_small, world_size
from .options import ServeArgs
from .protocol import Command, Event, Op, SubmitParams, command, events_line, line, parse_command

__all__ = ["IDLE_TICK_S", "FrontConnection", "serve_ranks", "share_commands"]

#: Longest time the ranks go without meeting while idle (seconds).
IDLE_TICK_S = 1.0
_GONE = Command(Op.STOP)


class FrontConnection:
    """Rank 0's end of the socket: commands come in on a reader thread, events go out from the loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.inbox: queue.Queue[Command] = queue.Queue()
        threading.Thread(target=self._read, name="front-reader", daemon=True).start()

    def _read(self) -> None:
        with self.sock.makefile("rb") as stream:
            for raw in stream:
                try:
                    self.inbox.put(parse_command(json.loads(raw)))
                except (ValueError, KeyError, TypeError):
                    continue  # the front writes these lines; a garbled one is dropped, not fatal
        self.inbox.put(_GONE)

    def take(self, wait_s: float) -> list[Command]:
        """The commands that arrived, waiting up to ``wait_s`` for the first one."""
        got: list[Command] = []
        try:
            got.append(self.inbox.get(timeout=wait_s) if wait_s > 0 else self.inbox.get_nowait())
            while True:
                got.append(self.inbox.get_nowait())
        except queue.Empty:
            return got

    def send(self, data: bytes) -> None:
        """Write one message; a front that went away is noticed by the reader."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.inbox.put(_GONE)


def share_commands(commands: list[Command], device: torch.device) -> list[Command]:
    """Rank 0's ``commands`` on every rank (collective: every rank calls it at every step)."""
    if world_size() == 1:
        return commands
    payload = json.dumps([command(c) for c in commands]).encode("utf-8") if commands else b""
    header = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    size = int(all_gather_small(header)[0].item())
    if size == 0:
        return []
    if dist.get_rank() == 0:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return [parse_command(c) for c in json.loads(bytes(buf.cpu().numpy()).decode("utf-8"))]


def _request(params: SubmitParams | None) -> Request:
    if params is None:
        raise ValueError("a submit command without its parameters")
    sampling = SamplingConfig(params.temperature, params.top_k, params.top_p, params.seed)
    return Request(params.prompt, params.max_tokens, sampling, params.ignore_eos)


class _Loop:
    """One rank's scheduler and what the front asked of it."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.scheduler = Scheduler(BatchEngine(model), frozenset(model.lm.eos_token_ids))
        self.draining = False
        self.stopping = False
        self.refused: list[TokenEvent] = []

    def apply(self, cmd: Command) -> None:
        if cmd.op is Op.SUBMIT and cmd.request is not None:
            if self.draining or self.stopping:
                self.refused.append(TokenEvent(cmd.request, None, Finish.CANCELLED))
                return
            try:
                self.scheduler.submit(cmd.request, _request(cmd.params))
            except (PromptError, ValueError):  # the front checks prompts first; never stop serving
                self.refused.append(TokenEvent(cmd.request, None, Finish.CANCELLED))
        elif cmd.op is Op.CANCEL and cmd.request is not None:
            self.scheduler.cancel(cmd.request)
        elif cmd.op is Op.DRAIN:
            self.draining = True
        elif cmd.op is Op.STOP:
            self.stopping = True
            for rid in [*self.scheduler.waiting, *self.scheduler.running]:
                self.scheduler.cancel(rid)

    def step(self) -> list[TokenEvent]:
        events, self.refused = self.refused, []
        if not self.scheduler.idle:
            events += self.scheduler.step()
        return events

    @property
    def done(self) -> bool:
        return (self.stopping or self.draining) and self.scheduler.idle


def _wire(events: list[TokenEvent]) -> bytes:
    return events_line([Event(e.request, e.token, e.finish.value if e.finish else None) for e in events])


def serve_ranks(program: RankProgram, args: ServeArgs, rank: int) -> int:
    """Serve until the front drains or stops the ranks (see the module doc); return the exit code."""
    model = CausalLM(program)
    loop = _Loop(model)
    front = FrontConnection(args.socket) if rank == 0 else None
    model.warm_up()  # writes position 0 of slot 0, which every prompt overwrites first
    if front is not None:
        front.send(line({"ready": {"slots": model.lm.max_batch_size}}))
    while not loop.done:
        mine = front.take(IDLE_TICK_S if loop.scheduler.idle else 0.0) if front is not None else []
        for cmd in share_commands(mine, model.device):
            loop.apply(cmd)
        events = loop.step()
        if front is not None and events:
            front.send(_wire(events))
    return EXIT_OK
