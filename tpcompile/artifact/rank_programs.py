"""Capturing every rank's program (lowering + ``torch.export`` + save), in parallel with weight writing.

Re-capturing a rank's graph is pure tracing (fake tensors, no weights) and takes most of a compile, so
ranks are captured in forked worker processes (one per core the parent leaves free, see
:mod:`tpcompile.artifact.workers`) while the parent streams the weight shards, and then by the parent as
well. Invariant: when the context exits without error, ``rankN/program.pt2`` exists for every rank, and
the files are the same as a sequential capture would write; when it exits, no worker is left.
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
from tpcompile.artifact.workers import job_failure, worker_pool
from tpcompile.passes.lower_rank import build_rank_graph
from tpcompile.passes.rule_api import Propagation
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
    comm_dtype: torch.dtype | None = None  # --comm-dtype (None: all-reduce payloads as they are)

    def run(self, rank: int) -> None:
        graph = build_rank_graph(self.gm, self.prop, rank, self.names, self.comm_dtype)
        program = export_rank_program(graph, self.stored[rank], self.examples, self.dynamic)
        save_program(program, self.out / f"rank{rank}" / PROGRAM_FILE)

    def capture(self, rank: int) -> BaseException | None:
        """:meth:`run`, with its failure as the result (it crosses from a worker process to the compiler):
        a typed compiler error or an ``OSError`` (a full disk) as it is, anything else as one line."""
        try:
            self.run(rank)
        except Exception as err:
            return job_failure(err, f"capturing rank {rank}'s program")
        return None


def _workers(tp: int) -> int:
    if (
        tp < 2
        or os.environ.get("TPCOMPILE_JOBS") == "1"
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return 0
    # the compiler keeps one core busy streaming weights (then it captures too); workers cost memory (each
    # traces a whole rank)
    return max(1, min(tp, (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def rank_program_pool(job: RankProgramJob, tp: int) -> Iterator[Iterator[int]]:
    """Start capturing all ranks' programs; the body runs meanwhile and may iterate the ranks as they
    finish (the compiler then captures ranks too). Leaving the context waits for all of them (and raises
    the first failure); the worker processes are gone when it is left, however it is left."""
    with worker_pool(job.capture, range(tp), _workers(tp), "fork") as pool:

        def finished() -> Iterator[int]:
            for rank, error in pool.results():
                if error is not None:
                    raise error
                yield rank

        yield finished()
        for _ in finished():
            pass
