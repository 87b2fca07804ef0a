"""``tprun serve`` on SmolLM2 at tp=2 (8 slots, KV cache 128), driven by the official ``openai`` client
against real processes: the API (models, completions, chat, streaming), 16 concurrent greedy requests
against ``tprun --prompt`` alone, malformed requests, a client that disconnects mid-stream, and the faults
(a rank killed with SIGKILL, SIGTERM with requests in flight). One compile for the whole file; the
functional tests share one server, each fault test starts its own."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the HTTP client the openai package uses
import pytest

from tests.conftest import tpcompile, tprun
from tests.processes import alive, children, kill_group, start, wait_for
from tpcompile.runtime.launch.launcher import free_port
from tpcompile.runtime.transport.segments import segment_files

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow  # SmolLM2 end to end

SLOTS = 8
SEQ = 128
KEY = "sk-test-key"
LOAD_TIMEOUT_S = 180.0
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Why is the sky blue?",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.",
    "What does a bee make?",
    "List two uses of copper.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Describe a cat in one sentence.",
    "How many legs does a spider have?",
    "What color is a ripe banana?",
    "Suggest a name for a pet fish.",
    "What is the opposite of cold?",
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import smollm2_gguf

    out = tmp_path_factory.mktemp("serve") / "smollm2"
    args = ("--tp", "2", "--max-seq-len", str(SEQ), "--max-batch-size", str(SLOTS), "--quiet")
    proc = tpcompile(smollm2_gguf(), "-o", out, *args)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def reference(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Each prompt's greedy tokens, answered one at a time by ``tprun --prompt``."""
    saved = tmp_path_factory.mktemp("ref") / "tokens.json"
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    proc = tprun(artifact, *args, "--max-new-tokens", str(MAX_NEW), "--save-tokens", saved)
    assert proc.returncode == 0, proc.stderr
    return [entry["new_ids"] for entry in json.loads(saved.read_text())]


class Server:
    """A running ``tprun serve`` (its own process group; ranks die with it)."""

    def __init__(self, art: Path, *extra: str) -> None:
        self.port = free_port()
        self.proc = start("tpcompile.runtime.cli", "serve", art, "--port", str(self.port), *extra)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not self.healthy():
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.base}/health", timeout=5).json()
        return data

    def client(self, key: str | None = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or "none", max_retries=0, timeout=300)

    def ranks(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        finally:
            kill_group(self.proc)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(artifact: Path) -> Iterator[Server]:
    srv = Server(artifact, "--api-key", KEY, "--max-queue", "4")
    try:
        yield srv
    finally:
        rc, err = srv.stop()
        assert rc == 0, err


def _chat(client: Any, prompt: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0, **kw
    )


def test_models_completions_chat_and_streaming(server: Server, reference: list[list[int]]) -> None:
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]

    chat = _chat(client, PROMPTS[0], max_tokens=MAX_NEW, extra_body={"return_token_ids": True})
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.model_extra["token_ids"] == reference[0]
    assert choice.finish_reason == ("stop" if len(reference[0]) < MAX_NEW else "length")
    assert chat.usage.completion_tokens == len(reference[0])
    assert chat.usage.prompt_tokens == len(choice.model_extra["prompt_token_ids"])

    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        temperature=0,
        max_tokens=MAX_NEW,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(reference[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                     temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    pieces = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                       temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text

    # the raw stream: Server-Sent Events ending with [DONE]; a stop string cuts the answer before it
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0,
            "stream": True, "stop": [" 8"]}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    assert " 8" not in streamed and events[-1]["choices"][0]["finish_reason"] == "stop"

    sampled = [
        _chat(client, PROMPTS[1], max_tokens=8, seed=7, extra_body={"top_k": 20}).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # temperature 0 overrides sampling; seeded sampling below
    hot = [
        client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                  top_p=0.9, seed=11).choices[0].text
        for _ in range(2)
    ]
    assert hot[0] == hot[1]


def test_sixteen_concurrent_greedy_requests_equal_each_prompt_alone(
    server: Server, reference: list[list[int]]
) -> None:
    """16 requests with different prompts and lengths over 8 slots, started 0.15 s apart (later ones
    arrive while earlier ones decode; some wait in the queue): each answer's tokens equal that prompt run
    alone through ``tprun --prompt``, cut at the request's max_tokens."""
    client = server.client()
    limits = [MAX_NEW - 2 * (i % 8) for i in range(len(PROMPTS))]

    def ask(i: int) -> list[int]:
        time.sleep(0.15 * i)
        for _ in range(100):  # bounded: a 429 while 8 run and 4 wait is retried
            try:
                out = _chat(client, PROMPTS[i], max_tokens=limits[i], extra_body={"return_token_ids": True})
                return list(out.choices[0].model_extra["token_ids"])
            except openai.RateLimitError:
                time.sleep(0.2)
        raise AssertionError("the server stayed busy")

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    for i, got in enumerate(answers):
        assert got == reference[i][: limits[i]], f"prompt {i}: {PROMPTS[i]!r}"


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(
    server: Server, reference: list[list[int]]
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.base}/v1/completions"
    good = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}
    cases: list[tuple[int, dict[str, Any]]] = [
        (400, {"content": b"{not json"}),
        (400, {"content": b"[1, 2]"}),
        (400, {"json": {"prompt": "Hi"}}),  # no model
        (400, {"json": {**good, "temperature": "hot"}}),
        (400, {"json": {**good, "temperature": 7}}),
        (400, {"json": {**good, "max_tokens": 0}}),
        (400, {"json": {**good, "top_p": 0}}),
        (400, {"json": {**good, "n": 2}}),
        (400, {"json": {**good, "frobnicate": True}}),
        (400, {"json": {**good, "prompt": "word " * SEQ}}),  # longer than the KV cache
        (400, {"json": {**good, "prompt": []}}),
        (400, {"json": {**good, "prompt": [10**9]}}),
        (400, {"json": {**good, "stop": [""]}}),
        (404, {"json": {**good, "model": "gpt-4"}}),
    ]
    sent = 0
    for i in range(100):
        status, kwargs = cases[i % len(cases)]
        with httpx.Client(timeout=30) as http:
            resp = http.post(url, headers={**auth, "content-type": "application/json"}, **kwargs)
        sent += 1
        assert resp.status_code == status, (kwargs, resp.text)
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, resp.text
    assert sent == 100
    too_long = httpx.post(url, headers=auth, json={**good, "prompt": "word " * SEQ}, timeout=30).json()
    assert f"holds {SEQ}" in too_long["error"]["message"]
    assert httpx.get(f"{server.base}/v1/models", timeout=10).status_code == 401  # no key
    assert httpx.get(f"{server.base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.base}/v2/nothing", headers=auth).json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    out = _chat(server.client(), PROMPTS[3], max_tokens=MAX_NEW, extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference[3]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(
    server: Server, reference: list[list[int]]
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 80, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=auth, timeout=60) as resp:
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break  # leaving the block closes the connection mid-stream
    wait_for(lambda: server.health()["open_requests"] == 0, 30, "the slot of the gone client to be freed")
    out = _chat(server.client(), PROMPTS[5], max_tokens=MAX_NEW, extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference[5]


def test_queue_full_is_429(server: Server) -> None:
    """8 running + 4 waiting (--max-queue 4): the 13th open request is refused with 429."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smollm2", "prompt": "Count to a thousand.", "max_tokens": 100, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{server.base}/v1/completions", json=body, headers=auth)
                   for _ in range(SLOTS + 4)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            wait_for(lambda: server.health()["open_requests"] == SLOTS + 4, 30, "12 open requests")
            refused = http.post(f"{server.base}/v1/completions", json={**body, "stream": False}, headers=auth)
            assert refused.status_code == 429 and "--max-queue" in refused.json()["error"]["message"]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    wait_for(lambda: server.health()["open_requests"] == 0, 30, "the closed streams to be cancelled")


def test_a_rank_killed_with_sigkill_gets_503_and_a_nonzero_exit(artifact: Path) -> None:
    srv = Server(artifact)
    try:
        ranks = srv.ranks()
        assert len(ranks) == 2
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(client.completions.create, model="smollm2", prompt=p, max_tokens=120,
                            temperature=0, extra_body={"ignore_eos": True})
                for p in PROMPTS[:3]
            ]
            wait_for(lambda: srv.health()["open_requests"] == 3, 30, "3 open requests")
            time.sleep(0.5)
            killed_at = time.monotonic()
            os.kill(ranks[1], signal.SIGKILL)
            for f in futures:
                with pytest.raises(openai.APIStatusError) as err:
                    f.result(timeout=60)
                assert err.value.status_code == 503
        rc = srv.proc.wait(timeout=30)
        assert time.monotonic() - killed_at < 30
        assert rc != 0
        err_text = srv.proc.communicate()[1]
        assert "rank 1 failed" in err_text, err_text
        wait_for(lambda: not any(alive(p) for p in ranks), 10, "the ranks to be gone")
        assert segment_files(ranks[0]) == []
    finally:
        kill_group(srv.proc)


def test_sigterm_with_requests_in_flight_finishes_them_and_leaves_nothing(
    artifact: Path, reference: list[list[int]]
) -> None:
    srv = Server(artifact, "--shutdown-timeout", "60")
    try:
        ranks = srv.ranks()
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            ids = {"return_token_ids": True}
            futures = [
                pool.submit(_chat, client, PROMPTS[i], max_tokens=MAX_NEW, extra_body=ids) for i in range(4)
            ]
            wait_for(lambda: srv.health()["open_requests"] == 4, 30, "4 open requests")
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: srv.health()["status"] != "ok", 10, "the server to stop taking requests")
            with pytest.raises(openai.APIStatusError) as late:
                _chat(client, PROMPTS[5], max_tokens=4)
            assert late.value.status_code == 503
            for i, f in enumerate(futures):
                assert f.result(timeout=120).choices[0].model_extra["token_ids"] == reference[i]
        rc, err = srv.proc.wait(timeout=60), srv.proc.communicate()[1]
        assert rc == 0, err
        assert not any(alive(p) for p in ranks)
        assert segment_files(ranks[0]) == []
        assert children(srv.proc.pid) == []
    finally:
        kill_group(srv.proc)

