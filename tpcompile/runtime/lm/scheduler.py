"""Continuous batching: which request runs in which slot at each step (:class:`Scheduler`).

Requests wait in arrival order; each :meth:`Scheduler.step` first admits waiting requests into free slots
(one prefill each, up to a budget of prompt tokens per step, at least one), then decodes every running
request once, and finishes the requests that hit an EOS id (``stop``, unless ``ignore_eos``), their token
limit or the end of their slot (``length``); a finished or cancelled request frees its slot for the next
step.

Invariant: the scheduler is deterministic: given the same calls (``submit`` / ``cancel`` / ``step``) in the
same order and the same tokens, it makes the same decisions. Every rank runs one with the same calls, so
the ranks run the same program calls in the same order without exchanging decisions (the server's rank 0
only forwards the calls it received: see ``runtime/serve/ranks.py``).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .batch import BatchEngine, check_prompt_length
from .options import SamplingConfig

__all__ = ["DEFAULT_PREFILL_BUDGET", "Finish", "Request", "Scheduler", "TokenEvent", "run_to_completion"]

#: Prompt tokens admitted per step beyond the first admission (a long prompt still gets in alone).
DEFAULT_PREFILL_BUDGET = 512


class Finish(enum.Enum):
    """Why a request ended (the values are OpenAI's ``finish_reason``, plus ``cancelled``)."""

    STOP = "stop"  # an EOS token (or, in the server, a stop string)
    LENGTH = "length"  # its max_new_tokens, or its KV-cache slot is full
    CANCELLED = "cancelled"  # cancelled before it finished (e.g. its client went away)


@dataclass(frozen=True)
class Request:
    """One sequence to generate: its prompt, how many tokens at most, how tokens are chosen."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TokenEvent:
    """A new ``token`` of request ``request`` (None when it was cancelled); ``finish`` on its last event."""

    request: int
    token: int | None
    finish: Finish | None = None


@dataclass
class _Running:
    request: Request
    slot: int
    limit: int
    produced: int = 0


@dataclass
class Scheduler:
    """Waiting and running requests over the slots of one :class:`BatchEngine` (see the module doc)."""

    engine: BatchEngine
    eos_ids: frozenset[int]
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    waiting: OrderedDict[int, Request] = field(default_factory=OrderedDict)
    running: dict[int, _Running] = field(default_factory=dict)
    _cancelled: list[int] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs."""
        return not self.waiting and not self.running and not self._cancelled

    def submit(self, request_id: int, request: Request) -> None:
        """Queue ``request`` under a new ``request_id``.

        Raises:
            PromptError: the prompt is empty or leaves no room in a slot for a new token.
            ValueError: ``request_id`` is already queued or running.
        """
        check_prompt_length(self.engine.model.lm, len(request.prompt_ids))
        if request_id in self.waiting or request_id in self.running:
            raise ValueError(f"request {request_id} is already scheduled")
        self.waiting[request_id] = request

    def cancel(self, request_id: int) -> None:
        """End ``request_id`` at the next step (a ``cancelled`` event); finished or unknown ids: no-op."""
        if request_id in self.waiting or request_id in self.running:
            self._cancelled.append(request_id)

    def step(self) -> list[TokenEvent]:
        """Apply cancellations, admit waiting requests, decode every running one; return the events."""
        events = [self._drop(rid) for rid in self._cancelled]
        self._cancelled.clear()
        events += self._admit()
        for slot, token in self.engine.decode().items():
            rid = next(r for r, run in self.running.items() if run.slot == slot)
            events.append(self._produced(rid, token))
        return events

    def _drop(self, request_id: int) -> TokenEvent:
        self.waiting.pop(request_id, None)
        running = self.running.pop(request_id, None)
        if running is not None:
            self.engine.release(running.slot)
        return TokenEvent(request_id, None, Finish.CANCELLED)

    def _admit(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        spent = 0
        while self.waiting:
            slot = self.engine.free_slot()
            rid, request = next(iter(self.waiting.items()))
            if slot is None or (events and spent + len(request.prompt_ids) > self.prefill_budget):
                break
            del self.waiting[rid]
            spent += len(request.prompt_ids)
            room = self.engine.model.lm.max_seq_len - len(request.prompt_ids)
            self.running[rid] = _Running(request, slot, min(request.max_new_tokens, room))
            token = self.engine.prefill(slot, request.prompt_ids, request.sampling)
            events.append(self._produced(rid, token))
        return events

    def _produced(self, request_id: int, token: int) -> TokenEvent:
        run = self.running[request_id]
        run.produced += 1
        finish = None
        if token in self.eos_ids and not run.request.ignore_eos:
            finish = Finish.STOP
        elif run.produced >= run.limit:
            finish = Finish.LENGTH
        if finish is not None:
            del self.running[request_id]
            self.engine.release(run.slot)
        return TokenEvent(request_id, token, finish)


def run_to_completion(
    scheduler: Scheduler,
    requests: Iterable[Request],
    on_event: Callable[[TokenEvent], None] | None = None,
) -> list[list[int]]:
    """Submit ``requests`` (ids 0, 1, ...) and step until all finished; return each one's new tokens."""
    out: list[list[int]] = []
    for rid, request in enumerate(requests):
        scheduler.submit(rid, request)
        out.append([])
    while not scheduler.idle:
        for event in scheduler.step():
            if event.token is not None:
                out[event.request].append(event.token)
            if on_event is not None:
                on_event(event)
    return out
