"""The messages between the front process and rank 0: one JSON object per line on a Unix socket.

Front -> rank 0 (*commands*, also what rank 0 forwards to the other ranks at every step):
``{"op": "submit", "id": N, "prompt": [...], "max_tokens": N, "temperature": x, "top_k": k|null,
"top_p": p|null, "seed": s, "ignore_eos": b}``, ``{"op": "cancel", "id": N}``, ``{"op": "drain"}`` (finish
what runs, take nothing new, then exit) and ``{"op": "stop"}`` (cancel everything and exit).
Rank 0 -> front: ``{"ready": {"slots": B}}`` once, then ``{"events": [[id, token|null, finish|null], ...]}``
after every step that produced any.

Invariant: :func:`command` and :func:`parse_command` are inverses, and so are :func:`events_line` and
:func:`parse_events`; standard library only (the front process does not import torch for this).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Command",
    "Event",
    "Op",
    "SubmitParams",
    "command",
    "events_line",
    "line",
    "parse_command",
    "parse_events",
]


class Op(enum.Enum):
    """What the front asks of the ranks."""

    SUBMIT = "submit"
    CANCEL = "cancel"
    DRAIN = "drain"
    STOP = "stop"


@dataclass(frozen=True)
class SubmitParams:
    """A request as the ranks see it: token ids and how to choose tokens."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Command:
    """One command; ``request`` for submit/cancel, ``params`` for submit."""

    op: Op
    request: int | None = None
    params: SubmitParams | None = None


@dataclass(frozen=True)
class Event:
    """A new token of ``request`` (None: cancelled), with the finish reason on its last event."""

    request: int
    token: int | None
    finish: str | None


def command(cmd: Command) -> dict[str, Any]:
    """The JSON object of ``cmd``."""
    out: dict[str, Any] = {"op": cmd.op.value}
    if cmd.request is not None:
        out["id"] = cmd.request
    if cmd.params is not None:
        p = cmd.params
        out.update(
            prompt=list(p.prompt),
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            seed=p.seed,
            ignore_eos=p.ignore_eos,
        )
    return out


def parse_command(data: dict[str, Any]) -> Command:
    """Inverse of :func:`command` (raises ``KeyError``/``ValueError`` on a malformed object)."""
    op = Op(data["op"])
    if op is not Op.SUBMIT:
        return Command(op, data.get("id"))
    params = SubmitParams(
        prompt=tuple(int(t) for t in data["prompt"]),
        max_tokens=int(data["max_tokens"]),
        temperature=float(data["temperature"]),
        top_k=data["top_k"],
        top_p=data["top_p"],
        seed=int(data["seed"]),
        ignore_eos=bool(data["ignore_eos"]),
    )
    return Command(op, int(data["id"]), params)


def line(obj: dict[str, Any]) -> bytes:
    """One message on the wire."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def events_line(events: Sequence[Event]) -> bytes:
    """The message carrying ``events``."""
    return line({"events": [[e.request, e.token, e.finish] for e in events]})


def parse_events(data: dict[str, Any]) -> list[Event]:
    """Inverse of :func:`events_line` (given the decoded object)."""
    return [Event(int(r), None if t is None else int(t), f) for r, t, f in data["events"]]
