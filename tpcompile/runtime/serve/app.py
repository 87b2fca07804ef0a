"""The HTTP routes of ``tprun serve`` (FastAPI): OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, and ``/health``.

Invariants: every error answer has OpenAI's error body (malformed JSON and invalid fields are 400, not
FastAPI's 422; unknown routes 404); with an API key every ``/v1`` route needs ``Authorization: Bearer
KEY`` (``/health`` does not); a streamed answer is Server-Sent Events ending with ``data: [DONE]``, and
an error after the stream started is sent as one ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .schemas import ApiError, ChatRequest, CompletionRequest, GenerationFields
from .service import Answer, Piece, Service

__all__ = ["build_app"]


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument: {'.'.join(where)}", where[-1] if where else None
    message = first.get("msg", "invalid request")
    return (f"{'.'.join(where)}: {message}" if where else message), (where[0] if where else None)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class _Formats:
    """The response objects of one endpoint (completions or chat)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.created = int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
        }

    def whole(self, text: str, finish: str | None, answer: Answer, token_ids: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if token_ids:
            choice.update(prompt_token_ids=answer.prompt_ids, token_ids=answer.token_ids)
        return {**self._base(False), "choices": [choice], "usage": answer.usage}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, answer: Answer) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": answer.usage}


def build_app(service: Service) -> FastAPI:
    """The application serving ``service``."""
    app = FastAPI(title="tprun serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return _error(ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}"))

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), service.api_key):
            raise ApiError(
                401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.link.failure is not None:
            return JSONResponse({"status": "failed", "reason": service.link.failure}, status_code=503)
        if service.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not service.link.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse(
            {"status": "ok", "slots": service.link.slots, "open_requests": service.link.open_requests}
        )

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {
            "id": service.name,
            "object": "model",
            "created": 0,
            "owned_by": "tpcompile",
            "max_model_len": service.lm.max_seq_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def answer(
        request: Request,
        req: GenerationFields,
        prompt_ids: Callable[[], list[int]],
        limit: int | None,
        chat: bool,
    ) -> Any:
        authorize(request)
        service.check_model(req.model)
        ids = prompt_ids()
        params = service.params(req, ids, limit)
        service.check_available()
        fmt = _Formats(chat, service.name)
        result = Answer(ids)
        pieces = service.generate(params, req.stop_strings(), result)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(
                _stream(pieces, fmt, result, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, finish = [], None
        async for piece in pieces:
            text.append(piece.text)
            finish = piece.finish
        return JSONResponse(fmt.whole("".join(text), finish, result, req.return_token_ids))

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Any:
        return await answer(request, req, lambda: service.completion_ids(req), req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest) -> Any:
        return await answer(request, req, lambda: service.chat_ids(req), req.token_limit(), chat=True)

    return app


async def _stream(
    pieces: AsyncIterator[Piece], fmt: _Formats, result: Answer, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks of ``pieces``; closing this generator early (a client that went away) closes
    ``pieces``, which cancels the request on the ranks."""
    try:
        if fmt.chat:
            yield _sse(fmt.chunk(None, None, first=True))
        async for piece in pieces:
            if piece.text or piece.finish:
                yield _sse(fmt.chunk(piece.text, piece.finish))
        if include_usage:
            yield _sse(fmt.usage_chunk(result))
        yield _DONE
    except ApiError as exc:
        yield _sse(exc.body() | {"status": exc.status})
        yield _DONE
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


_DONE = b"data: [DONE]\n\n"
