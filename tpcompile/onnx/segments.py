"""Cutting a rank's ONNX model at its collectives into segments that stock onnxruntime can run.

The model's nodes are in topological order; each ``tpcompile`` collective node ends the current segment.
Invariant: running the steps in order (segment, collective, segment, ...) over one environment of named
values computes the model: a segment's inputs are the values it reads that earlier steps (or the program's
inputs) produced, its outputs are the values it produces that later steps or the program's outputs read.
Initializers travel with the segments that read them (the weights stay in the rank's safetensors file).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import helper

from tpcompile.errors import UnsupportedModelError
from tpcompile.onnx.export import ALL_GATHER, ALL_REDUCE, DOMAIN
from tpcompile.runtime.format.onnx_section import Collective, OnnxRank, Segment, Step, ValueSpec


def _spec(vi: onnx.ValueInfoProto) -> ValueSpec:
    t = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    bf16 = t.elem_type == onnx.TensorProto.BFLOAT16
    dtype = "bfloat16" if bf16 else onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return ValueSpec(vi.name, dtype, dims)


def _collective(node: onnx.NodeProto) -> Collective:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == ALL_REDUCE:
        op = str(
            attrs.get("reduce_op", b"sum").decode()
            if isinstance(attrs.get("reduce_op"), bytes)
            else attrs.get("reduce_op", "sum")
        )
        return Collective("all_reduce", node.input[0], node.output[0], reduce_op=op)
    if node.op_type == ALL_GATHER:
        return Collective("all_gather", node.input[0], node.output[0], group_size=int(attrs["group_size"]))
    raise UnsupportedModelError(f"unknown collective {DOMAIN}.{node.op_type} in a rank program")


def _reads(node: onnx.NodeProto) -> list[str]:
    names = [i for i in node.input if i]
    for attr in node.attribute:  # outer-scope values read by subgraphs (If/Loop/Scan)
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = (
                {o for n in g.node for o in n.output}
                | {i.name for i in g.input}
                | {i.name for i in g.initializer}
            )
            names += [x for n in g.node for x in _reads(n) if x not in inner]
    return names


def split_model(model: ir.Model, rank_dir: Path, prefix: str = "segment") -> tuple[OnnxRank, list[Path]]:
    """Write each segment of ``model`` to ``rank_dir/{prefix}{i}.onnx``; return the steps and the files."""
    proto = ir.serde.serialize_model(model)
    graph = proto.graph
    value_info = {vi.name: vi for vi in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {t.name: t for t in graph.initializer}
    groups: list[list[onnx.NodeProto]] = [[]]
    collectives: list[Collective] = []
    for node in graph.node:
        if node.domain == DOMAIN:
            collectives.append(_collective(node))
            groups.append([])
        else:
            groups[-1].append(node)
    # a value is needed after group g when a later group, a collective after g, or the program output reads it
    last_read: dict[str, int] = {}
    for g, nodes in enumerate(groups):
        for node in nodes:
            for name in _reads(node):
                last_read[name] = g
    for k, c in enumerate(collectives):
        last_read[c.input] = max(last_read.get(c.input, -1), k + 1)  # read "before group k + 1"
    final = len(groups)
    for out in graph.output:
        last_read[out.name] = final
    steps: list[Step] = []
    files: list[Path] = []
    for g, nodes in enumerate(groups):
        if nodes:
            produced = {o for n in nodes for o in n.output if o}
            reads = list(dict.fromkeys(x for n in nodes for x in _reads(n)))
            inputs = [x for x in reads if x not in produced and x not in initializers]
            outputs = [o for n in nodes for o in n.output if o and last_read.get(o, -1) > g]
            used_init = [initializers[x] for x in reads if x in initializers]
            name = f"{prefix}{len(files)}"
            seg = helper.make_graph(
                nodes,
                name,
                [_info(value_info, x) for x in inputs],
                [_info(value_info, x) for x in outputs],
                initializer=used_init,
            )
            seg.value_info.extend(value_info[x] for x in produced - set(outputs) if x in value_info)
            m = helper.make_model(
                seg,
                opset_imports=[o for o in proto.opset_import if o.domain != DOMAIN],
                ir_version=proto.ir_version,
                producer_name="tpcompile",
            )
            path = rank_dir / f"{name}.onnx"
            onnx.save_model(m, str(path))
            onnx.checker.check_model(str(path), full_check=True)
            files.append(path)
            steps.append(Segment(path.name, tuple(inputs), tuple(outputs), len(nodes)))
        if g < len(collectives):
            steps.append(collectives[g])
    specs = (tuple(_spec(vi) for vi in graph.input), tuple(_spec(vi) for vi in graph.output))
    return OnnxRank(*specs, tuple(steps)), files


def _info(value_info: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    if name not in value_info:
        raise UnsupportedModelError(
            f"ONNX value {name!r} has no type information; cannot cut the graph there"
        )
    return value_info[name]
