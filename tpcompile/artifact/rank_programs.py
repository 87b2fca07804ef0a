"""Capturing every rank's program (lowering + ``torch.export`` + save), in parallel with weight writing.

Re-capturing a rank's graph is pure tracing (fake tensors, no weights) and takes most of a compile, so
ranks are captured in forked worker processes (one per core the parent leaves free) while the parent
streams the weight shards. Invariant: when the context exits without error, ``rankN/program.pt2`` exists
for every rank, and the files are the same as a sequential capture would write.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from tpcompile.artifact.program import StoredTensor, export_rank_program, save_program
from tpcompile.errors import TpCompileError, UnsupportedModelError
from tpcompile.passes.lower_rank import build_rank_graph
from tpcompile.passes.rule_api import Propagation
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.format import PROGRAM_FILE


@dataclass
class RankProgramJob:
    gm: fx.GraphModule
    prop: Propagation
    names: dict[fx.Node, str]
    stored: list[list[StoredTensor]]  # rank r's at index r
    examples: list[torch.Tensor]
    dynamic: Any
    out: Path

    def run(self, rank: int) -> None:
        graph = build_rank_graph(self.gm, self.prop, rank, self.names)
        program = export_rank_program(graph, self.stored[rank], self.examples, self.dynamic)
        save_program(program, self.out / f"rank{rank}" / PROGRAM_FILE)


_JOB: RankProgramJob | None = None  # what forked workers inherit


def _run_in_worker(rank: int) -> tuple[int, str | None]:
    assert _JOB is not None
    try:
        _JOB.run(rank)
    except TpCompileError as err:
        return rank, str(err)
    except Exception as err:  # reported by the parent as an unsupported model, with the first line
        first = first_line(err)
        return rank, f"capturing rank {rank}'s program failed: {type(err).__name__}: {first}"
    return rank, None


def _workers(tp: int) -> int:
    if (
        tp < 2
        or os.environ.get("TPCOMPILE_JOBS") == "1"
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return 0
    # the parent keeps one core busy streaming weights; workers cost memory (each traces a whole rank)
    return max(1, min(tp, (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def rank_program_pool(job: RankProgramJob, tp: int) -> Iterator[Iterator[int]]:
    """Start capturing all ranks' programs; the body runs meanwhile and may iterate the ranks as they
    finish. Leaving the context waits for all of them (and raises the first failure)."""
    global _JOB
    workers = _workers(tp)
    if workers < 1:
        yield _sequential(job, tp)
        return
    _JOB = job
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        results = pool.imap_unordered(_run_in_worker, range(tp))
        done: list[int] = []

        def finished() -> Iterator[int]:
            for rank, error in results:
                if error is not None:
                    raise UnsupportedModelError(error)
                done.append(rank)
                yield rank

        yield finished()
        for _ in finished():
            pass
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        _JOB = None


def _sequential(job: RankProgramJob, tp: int) -> Iterator[int]:
    for rank in range(tp):
        job.run(rank)
        yield rank
