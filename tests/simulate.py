"""An in-process check of the passes: run every rank's lowered graph and replace each collective by its
definition (sum of partials, concatenation of shards). Cheap enough to sweep all tp values; the real runtime
(gloo processes) is tested separately."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from tpcompile.compiler import plan_model
from tpcompile.frontend.capture import CapturedModel
from tpcompile.passes.lower_rank import build_rank_graph
from tpcompile.passes.slicing import local_tensor
from tpcompile.plan.spec import PlanFile
from tpcompile.runtime.format.hardware import HardwareProfile

c10d = torch.ops._c10d_functional


class Simulator:
    """Every rank's lowered graph and its state (kept across calls, so in-place KV cache writes persist)."""

    def __init__(
        self,
        captured: CapturedModel,
        tp: int,
        plan_file: PlanFile | None = None,
        profile: HardwareProfile | None = None,
    ) -> None:
        self.tp = tp
        self.plan, self.prop = plan_model(captured, tp, plan_file, profile=profile)
        names = captured.state_names()
        self.graphs = [build_rank_graph(captured.gm, self.prop, r, names) for r in range(tp)]
        self.state = [
            {
                names[n]: local_tensor(captured.read_tensor(names[n]), self.prop.roots[n], r).clone()
                for n in names
            }
            for r in range(tp)
        ]

    def run(self, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Outputs of every rank (each a list of tensors) for the given user inputs."""
        tp, state = self.tp, self.state
        envs: list[dict[fx.Node, Any]] = [{} for _ in range(tp)]
        iters = [iter(g.nodes) for g in self.graphs]
        pending: list[fx.Node | None] = [None] * tp
        results: list[list[torch.Tensor] | None] = [None] * tp

        def load(r: int, a: Any) -> Any:
            return fx.map_arg(a, lambda n: envs[r][n])

        feeds = [iter(inputs) for _ in range(tp)]

        def advance(r: int) -> None:
            """Run rank r until its next collective (left in pending[r]) or its end."""
            for node in iters[r]:
                if node.op == "placeholder":
                    envs[r][node] = next(feeds[r])
                    continue
                if node.op == "get_attr":
                    envs[r][node] = state[r][node.target]
                    continue
                if node.op == "output":
                    results[r] = list(torch.utils._pytree.tree_leaves(load(r, node.args[0])))
                    return
                if node.target in (c10d.all_reduce.default, c10d.all_gather_into_tensor.default):
                    pending[r] = node
                    return
                if node.target is c10d.wait_tensor.default:
                    envs[r][node] = envs[r][node.args[0]]
                    continue
                envs[r][node] = node.target(*load(r, node.args), **load(r, node.kwargs))

        with torch.no_grad():
            for r in range(tp):
                advance(r)
            while any(p is not None for p in pending):
                nodes = pending
                assert all(n is not None and n.target == nodes[0].target for n in nodes), "ranks disagree"
                values = [envs[r][n.args[0]] for r, n in enumerate(nodes)]  # type: ignore[union-attr]
                if nodes[0].target == c10d.all_reduce.default:  # type: ignore[union-attr]
                    total = torch.stack(values).sum(0)
                    outs = [total.clone() for _ in range(tp)]
                else:
                    outs = [torch.cat(values, 0) for _ in range(tp)]
                pending = [None] * tp
                for r, n in enumerate(nodes):
                    envs[r][n] = outs[r]
                    advance(r)
        return [r for r in results if r is not None]


def simulate(
    captured: CapturedModel,
    tp: int,
    inputs: list[torch.Tensor],
    plan_file: PlanFile | None = None,
    profile: HardwareProfile | None = None,
) -> list[list[torch.Tensor]]:
    """Outputs of every rank (each a list of tensors) for the given user inputs; ``profile``: the plan
    weighed on it (``compile --profile``)."""
    return Simulator(captured, tp, plan_file, profile).run(inputs)
