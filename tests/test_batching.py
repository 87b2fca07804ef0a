"""Independent rows and continuous batching, in-process: the batched program (tiny Llama, every rank's
graph run by tests/simulate.py) against transformers, the plan of that program, the scheduler on a fake
model, and the server's pure parts (stop strings, the rank protocol)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tests.checkpoints import random_checkpoint
from tests.simulate import Simulator
from tpcompile.frontend.hf import load_hf
from tpcompile.runtime.format import LMInfo, Replicate, Shard
from tpcompile.runtime.lm.batch import BatchEngine
from tpcompile.runtime.lm.options import SamplingConfig
from tpcompile.runtime.lm.sampling import VocabShard
from tpcompile.runtime.lm.scheduler import Finish, Request, Scheduler, TokenEvent, run_to_completion
from tpcompile.runtime.serve.protocol import (
    Command,
    Event,
    Op,
    SubmitParams,
    command,
    events_line,
    parse_command,
    parse_events,
)
from tpcompile.runtime.serve.service import StopMatcher

LAYERS = 2
SEQ = 32
SLOTS = 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama",
        hidden_size=96,
        intermediate_size=128,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_hidden_layers=LAYERS,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return random_checkpoint(config, tmp_path_factory.mktemp("rows") / "ckpt")


def _gathered(outs: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.cat([o[0] for o in outs], dim=-1)  # logits are vocabulary-sharded


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_independent_rows_match_transformers_and_keep_the_plan(tiny_llama: Path, tp: int) -> None:
    """Prompts of different lengths prefilled into their own slots, then decoded together (a window of
    all slots, and a window starting past slot 0): each row's logits equal transformers on that row alone;
    2 all-reduces per layer + 1, no all-gather, and the KV cache split by KV heads."""
    from transformers import AutoModelForCausalLM

    captured = load_hf(tiny_llama, max_seq_len=SEQ, max_batch_size=SLOTS)
    assert [n.name for n in captured.gm.graph.nodes if n.op == "placeholder"][-3:] == [
        "input_ids",
        "position_ids",
        "first_slot",
    ]
    sim = Simulator(captured, tp)
    ops = Counter(str(n.target) for n in sim.graphs[0].nodes if n.op == "call_function")
    assert ops["_c10d_functional.all_reduce.default"] == (2 * LAYERS + 1 if tp > 1 else 0)
    assert ops["_c10d_functional.all_gather_into_tensor.default"] == 0
    caches = {name: sim.prop.roots[n] for n, name in captured.state_names().items() if "kv_cache" in name}
    assert len(caches) == 2 * LAYERS
    for placement in caches.values():
        assert tp == 1 or (isinstance(placement, Shard) and placement.dim == 1), placement  # by KV head

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [19, 10], [11, 12, 13], [40]]
    err = 0.0
    with torch.no_grad():
        for slot, p in enumerate(prompts):
            got = _gathered(sim.run([torch.tensor([p]), torch.arange(len(p))[None], torch.tensor([slot])]))
            err = max(err, (got - model(torch.tensor([p])).logits).abs().max().item())
        step = [3, 4, 5, 6]
        got = _gathered(
            sim.run(
                [
                    torch.tensor([[t] for t in step]),
                    torch.tensor([[len(p)] for p in prompts]),
                    torch.tensor([0]),
                ]
            )
        )
        for b, p in enumerate(prompts):
            ref = model(torch.tensor([[*p, step[b]]])).logits[0, -1]
            err = max(err, (got[b, -1] - ref).abs().max().item())
        # slots 1 and 2 only; slot 1 then gets a new, shorter sequence over its stale entries
        got = _gathered(sim.run([torch.tensor([[7], [8]]), torch.tensor([[3], [4]]), torch.tensor([1])]))
        for b, (p, t, new) in enumerate(zip(prompts[1:3], step[1:3], [7, 8], strict=True)):
            ref = model(torch.tensor([[*p, t, new]])).logits[0, -1]
            err = max(err, (got[b, -1] - ref).abs().max().item())
        got = _gathered(sim.run([torch.tensor([[50]]), torch.tensor([[0]]), torch.tensor([1])]))
        err = max(err, (got[0, -1] - model(torch.tensor([[50]])).logits[0, -1]).abs().max().item())
    assert err < 1e-4


class FakeModel:
    """A row model whose next token is ``(token + position + slot) % 8`` (token 9 never, EOS is 7), and
    which records every call as ``(first_slot, rows, tokens per row)``."""

    def __init__(self, slots: int = 3, seq: int = 16) -> None:
        self.lm = LMInfo(
            vocab_size=10, max_seq_len=seq, max_batch_size=slots, eos_token_ids=(7,), independent_rows=True
        )
        self.shard = VocabShard(Replicate(), 0, 10)
        self.calls: list[tuple[int, int, int]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward_rows(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> torch.Tensor:
        self.calls.append((first_slot, ids.shape[0], ids.shape[1]))
        last, pos = ids[:, -1], positions[:, -1]
        nxt = (last + pos + 1) % 8
        return torch.nn.functional.one_hot(nxt, 10).float()

    def choose(
        self,
        logits: torch.Tensor,
        configs: Sequence[SamplingConfig],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        return [int(t) for t in logits.argmax(-1)]


def _alone(prompt: Sequence[int], limit: int, eos: int = 7) -> list[int]:
    """What FakeModel generates for ``prompt`` alone."""
    out, token, pos = [], prompt[-1], len(prompt) - 1
    while len(out) < limit:
        token = (token + pos + 1) % 8
        pos += 1
        out.append(token)
        if token == eos:
            break
    return out


def test_scheduler_gives_each_request_its_own_answer_and_reuses_slots() -> None:
    model = FakeModel(slots=3, seq=16)
    scheduler = Scheduler(BatchEngine(model), frozenset({7}))
    prompts = [[1, 2], [3], [4, 4, 4], [2, 2], [5], [1, 1, 1, 1]]
    requests = [Request(tuple(p), 5) for p in prompts]
    got = run_to_completion(scheduler, requests)
    assert got == [_alone(p, 5) for p in prompts]
    assert scheduler.idle and not scheduler.engine.busy
    assert len([c for c in model.calls if c[2] > 1]) == 4  # one prefill per prompt longer than a token
    assert all(first + rows <= 3 for first, rows, _ in model.calls)  # never past the 3 slots


def test_scheduler_finishes_on_eos_length_and_slot_end_and_cancels() -> None:
    model = FakeModel(slots=2, seq=6)
    scheduler = Scheduler(BatchEngine(model), frozenset({7}))
    events: list[TokenEvent] = []
    scheduler.submit(10, Request((3,), 50))  # 3 -> 4 -> 6 -> 1 -> 5 -> 2: runs until its slot is full
    scheduler.submit(11, Request((6,), 50))  # 6 -> 7: EOS
    scheduler.submit(12, Request((1, 1), 50, ignore_eos=True))
    scheduler.submit(13, Request((2,), 3))
    while not scheduler.idle:
        events += scheduler.step()
        if any(e.request == 12 for e in events) and 12 in scheduler.running:
            scheduler.cancel(12)
    last = {e.request: e for e in events}
    assert last[11].finish is Finish.STOP and last[11].token == 7
    assert last[10].finish is Finish.LENGTH and len([e for e in events if e.request == 10]) == 6 - 1
    assert last[12].finish is Finish.CANCELLED and last[12].token is None
    assert last[13].finish is Finish.LENGTH and len([e for e in events if e.request == 13]) == 3
    scheduler.cancel(12)  # finished: ignored
    assert scheduler.idle


def test_scheduler_prefill_budget_admits_at_least_one() -> None:
    model = FakeModel(slots=3, seq=64)
    scheduler = Scheduler(BatchEngine(model), frozenset({7}), prefill_budget=4)
    for rid, n in enumerate([10, 3, 2]):
        scheduler.submit(rid, Request(tuple([1] * n), 2))
    first = scheduler.step()
    assert {e.request for e in first} == {0}  # 10 tokens alone; the others wait for the next step
    second = scheduler.step()
    assert {e.request for e in second} >= {1}


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_before_it() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("Hello E") == ("Hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed(" done\n") == (" done", False)
    assert m.feed("\nmore") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("aE") == ("a", False)
    assert m.flush() == "E"
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_protocol_round_trips() -> None:
    params = SubmitParams((1, 2, 3), 16, 0.7, 40, 0.9, 123, True)
    for cmd in [Command(Op.SUBMIT, 5, params), Command(Op.CANCEL, 5), Command(Op.DRAIN), Command(Op.STOP)]:
        assert parse_command(command(cmd)) == cmd
    import json

    events = [Event(1, 5, None), Event(2, None, "cancelled"), Event(1, 7, "stop")]
    assert parse_events(json.loads(events_line(events))) == events


def test_a_compiled_artifact_reaches_its_last_slot(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved rank program (re-captured by the compiler, not the simulator's graph) decodes in every
    slot, the last one included, and one row at a time: more prompts than slots through
    ``CausalLM.generate_batch`` in a real one-rank process group, each equal to transformers alone."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tests.conftest import tpcompile
    from tpcompile.runtime import CausalLM
    from tpcompile.runtime.launch.launcher import free_port
    from tpcompile.runtime.transport.distributed import destroy_group, init_group

    art = tmp_path / "art"
    proc = tpcompile(tiny_llama, "--tp", "1", "--max-batch-size", str(SLOTS), "--max-seq-len", str(SEQ),
                     "-o", art, "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_group("gloo", torch.device("cpu"), 60.0)
    try:
        lm = CausalLM.load(art)
        prompts = [[5, 6, 7, 8, 9], [19, 10], [11, 12, 13], [40], [3, 33, 63], [70, 71]]
        got = lm.generate_batch(prompts, max_new_tokens=6, ignore_eos=True)
        alone = [lm.generate(p, max_new_tokens=6) for p in prompts[:1]]
    finally:
        destroy_group()
    assert not dist.is_initialized()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(prompt) :]
        assert tokens == ref.tolist(), prompt
    assert alone[0] == got[0]
