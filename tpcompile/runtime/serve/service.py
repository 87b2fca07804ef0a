"""One request's life in the front process: prompt ids in, text pieces out (:class:`Service`).

The front tokenizes (the artifact's tokenizer and chat template), checks the prompt against a KV-cache
slot, submits it to the ranks through the :class:`~.link.RankLink`, turns the tokens that come back into
text (:class:`~tpcompile.runtime.lm.tokenization.StreamDecoder`) and ends the request at a stop string,
cancelling it on the ranks.

Invariants:
- a stop string never reaches the client: text that could be the start of one is held back until it
  is not, and the answer ends before the stop string;
- a request whose consumer goes away (a client that disconnected) is cancelled on the ranks, which free
  its slot at their next step;
- requests beyond the slots plus ``max_queue`` waiting ones are refused (429), and every request is
  refused with a 503 once the ranks are gone or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..format import LMInfo
from ..lm.tokenization import StreamDecoder, encode_chat, encode_prompt
from .link import Failure, RankLink
from .protocol import Event, SubmitParams
from .schemas import ApiError, ChatRequest, CompletionRequest, GenerationFields

__all__ = ["Answer", "Piece", "Service", "StopMatcher"]


class StopMatcher:
    """Finds the first stop string in streamed text, holding back what may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit: then the text ends before it)."""
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What is held back, once no more text comes."""
        text, self.held = self.held, ""
        return text


@dataclass
class Piece:
    """Text for the client; ``finish`` (``stop`` / ``length``) on the last piece."""

    text: str
    finish: str | None = None


@dataclass
class Answer:
    """What a request produced, for the response's ``usage`` and ``token_ids``."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Service:
    """The front's view of the model: names, limits, tokenizer, and the link to the ranks."""

    def __init__(
        self, name: str, lm: LMInfo, tokenizer: Any, link: RankLink, *, max_queue: int, api_key: str | None
    ) -> None:
        self.name = name
        self.lm = lm
        self.tokenizer = tokenizer
        self.link = link
        self.max_queue = max_queue
        self.api_key = api_key
        self.shutting_down = False
        self._ids = itertools.count(1)

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist (this server serves `{self.name}`)",
                param="model",
                code="model_not_found",
            )

    def check_available(self) -> None:
        """503 unless the ranks are up; 429 when the queue is full."""
        if self.link.failure is not None:
            raise ApiError(503, f"the model is unavailable: {self.link.failure}")
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down")
        if not self.link.ready.is_set():
            raise ApiError(503, "the model is still loading")
        if self.link.open_requests >= self.link.slots + self.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {self.link.slots} requests running and {self.max_queue} waiting "
                "(--max-queue); retry later",
            )

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.single_prompt()
        if isinstance(prompt, list):
            if any(not 0 <= t < self.lm.vocab_size for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {self.lm.vocab_size})", param="prompt")
            return prompt
        return encode_prompt(self.tokenizer, prompt, False)

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if not self.lm.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return encode_chat(self.tokenizer, messages)
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    def params(self, req: GenerationFields, prompt_ids: list[int], limit: int | None) -> SubmitParams:
        """The ranks' view of a request; 400 when the prompt does not fit a KV-cache slot."""
        n, room = len(prompt_ids), self.lm.max_seq_len
        if n < 1:
            raise ApiError(400, "the prompt is empty (0 tokens)", param="prompt")
        if n >= room:
            raise ApiError(
                400,
                f"the prompt has {n} tokens but the KV cache holds {room} (at most {room - 1} prompt "
                "tokens, to leave room for one new token)",
                param="prompt",
                code="context_length_exceeded",
            )
        defaults = self.lm.generation
        temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
        top_p = req.top_p if req.top_p is not None else defaults.get("top_p")
        top_k = req.top_k if req.top_k is not None else defaults.get("top_k")
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        return SubmitParams(
            prompt=tuple(prompt_ids),
            max_tokens=limit if limit is not None else room - n,
            temperature=float(temperature),
            top_k=int(top_k) if top_k else None,
            top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
            seed=int(seed),
            ignore_eos=req.ignore_eos,
        )

    async def generate(self, params: SubmitParams, stops: list[str], answer: Answer) -> AsyncIterator[Piece]:
        """Submit and yield the answer's text pieces; the last has ``finish``. Cancels on the ranks when
        the consumer stops early (a client that went away)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event | Failure] = asyncio.Queue()
        request = next(self._ids)

        def sink(event: Event | Failure) -> None:  # called on the link's reader thread
            loop.call_soon_threadsafe(inbox.put_nowait, event)

        self.link.submit(request, params, sink)
        decoder = StreamDecoder(self.tokenizer)
        matcher = StopMatcher(stops)
        finished = False
        try:
            while True:
                event = await inbox.get()
                if isinstance(event, Failure):
                    finished = True
                    raise ApiError(503, f"the model is unavailable: {event.reason}")
                if event.token is None:  # cancelled by the ranks (the server is stopping)
                    finished = True
                    raise ApiError(503, "the request was cancelled: the server is shutting down")
                answer.token_ids.append(event.token)
                text, hit = matcher.feed(decoder.feed(event.token))
                if hit:
                    finished = True
                    self.link.cancel(request)
                    yield Piece(text, "stop")
                    return
                if event.finish is not None:
                    finished = True
                    tail, hit = matcher.feed(decoder.finish())
                    rest = "" if hit else matcher.flush()
                    yield Piece(text + tail + rest, "stop" if hit else event.finish)
                    return
                if text:
                    yield Piece(text)
        finally:
            if not finished:
                self.link.cancel(request)
