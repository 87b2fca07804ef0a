"""Exporting a rank's stateful module to one ONNX model whose collectives are ``tpcompile`` domain nodes.

The ``_c10d_functional`` collectives become ``tpcompile.AllReduce`` / ``tpcompile.AllGather`` nodes (their
schemas are registered here so that the exporter and the ONNX checker know them; no runtime implements
them: the model is cut at these nodes, see :mod:`tpcompile.onnx.segments`). Stored tensors become
initializers that point into the rank's ``weights.safetensors`` (ONNX external data), so no weight is
copied into an ONNX file.
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
import torch.distributed._functional_collectives  # noqa: F401  (fake kernels for tracing collectives)
from onnx.defs import OpSchema

from tpcompile.errors import UnsupportedModelError
from tpcompile.onnx.functional import StatefulModule
from tpcompile.runtime.errors import first_line

DOMAIN = "tpcompile"
ALL_REDUCE = "AllReduce"
ALL_GATHER = "AllGather"
OPSET = 20
_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)"]
_c10d = torch.ops._c10d_functional


def _register_schemas() -> None:
    for name, attr in ((ALL_REDUCE, ("reduce_op", OpSchema.AttrType.STRING)), (ALL_GATHER, None)):
        try:
            onnx.defs.get_schema(name, 1, DOMAIN)
            continue
        except onnx.defs.SchemaError:
            pass
        attrs = [OpSchema.Attribute(attr[0], attr[1], "")] if attr else []
        if name == ALL_GATHER:
            attrs = [OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "")]
        onnx.defs.register_schema(
            OpSchema(
                name,
                DOMAIN,
                1,
                inputs=[OpSchema.FormalParameter("x", "T")],
                outputs=[OpSchema.FormalParameter("y", "T")],
                type_constraints=[("T", _TYPES, "")],
                attributes=attrs,
            )
        )


def _translation_table() -> dict[Any, Any]:
    import onnxscript

    _register_schemas()
    dom = onnxscript.values.Opset(DOMAIN, 1)
    std = onnxscript.values.Opset("", OPSET)

    def all_reduce(x: Any, reduce_op: str, group_name: str) -> Any:
        return dom.AllReduce(x, reduce_op=reduce_op)

    def all_gather(x: Any, group_size: int, group_name: str) -> Any:
        return dom.AllGather(x, group_size=group_size)

    def wait_tensor(x: Any) -> Any:
        return std.Identity(x)

    return {
        _c10d.all_reduce.default: all_reduce,
        _c10d.all_gather_into_tensor.default: all_gather,
        _c10d.wait_tensor.default: wait_tensor,
    }


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int, str, list[int]]]:
    """name -> (absolute byte offset, length, dtype, shape) of every tensor in a safetensors file."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        name: (
            base + int(e["data_offsets"][0]),
            int(e["data_offsets"][1]) - int(e["data_offsets"][0]),
            str(e["dtype"]),
            [int(s) for s in e["shape"]],
        )
        for name, e in header.items()
        if name != "__metadata__"
    }


_ST_DTYPES = {
    "F32": ir.DataType.FLOAT,
    "F16": ir.DataType.FLOAT16,
    "BF16": ir.DataType.BFLOAT16,
    "F64": ir.DataType.DOUBLE,
    "I64": ir.DataType.INT64,
    "I32": ir.DataType.INT32,
    "BOOL": ir.DataType.BOOL,
    "I8": ir.DataType.INT8,
    "U8": ir.DataType.UINT8,
}


def export_model(stateful: StatefulModule, weights: Path) -> ir.Model:
    """The whole rank as one ONNX model (collectives inline); initializers reference ``weights``."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                stateful.module,
                stateful.examples,
                dynamo=True,
                dynamic_shapes=stateful.dynamic_shapes,
                custom_translation_table=_translation_table(),
                optimize=False,
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as err:
        first = first_line(err)
        raise UnsupportedModelError(f"exporting a rank's program to ONNX failed: {first}") from err
    assert program is not None
    model = program.model
    _name_io(model, stateful)
    stored = _externalize(model, weights)
    missing = sorted(n for n in stateful.stored if n in model.graph.initializers and n not in stored)
    if missing:
        raise UnsupportedModelError(f"{weights.name} has no tensor {missing[0]!r} that the program reads")
    _optimize(model, stored)
    return model


def _name_io(model: ir.Model, stateful: StatefulModule) -> None:
    """Graph inputs/outputs get stable names: the user inputs' names, ``out{i}``, ``state.{name}``."""
    inputs = list(model.graph.inputs)
    for value, name in zip(inputs, stateful.user_inputs + [f"in.{s}" for s in stateful.state], strict=True):
        value.name = name
    outs = list(model.graph.outputs)
    names = [f"out{i}" for i in range(stateful.n_outputs)] + [f"out.{s}" for s in stateful.state]
    for i, (value, name) in enumerate(zip(outs, names, strict=True)):
        if value.is_graph_input() or value.producer() is None or value in outs[:i]:
            # an output that is an input (or repeated) needs its own value: route it through Identity
            node = ir.node("Identity", [value], num_outputs=1)
            model.graph.append(node)
            node.outputs[0].name = name
            node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
            model.graph.outputs[i] = node.outputs[0]
        else:
            value.name = name


def _externalize(model: ir.Model, weights: Path) -> set[str]:
    """Point each initializer stored in ``weights`` at its bytes there; return their names."""
    offsets = safetensors_offsets(weights) if weights.is_file() else {}
    stored: set[str] = set()
    for name, value in model.graph.initializers.items():
        if name not in offsets:
            continue
        offset, length, dtype, shape = offsets[name]
        if list(value.shape or []) != shape or _ST_DTYPES.get(dtype) != value.dtype:
            raise UnsupportedModelError(f"{weights.name}: tensor {name!r} does not match the program's")
        value.const_value = ir.ExternalTensor(
            weights.name,
            offset,
            length,
            _ST_DTYPES[dtype],
            shape=ir.Shape(shape),
            name=name,
            base_dir=str(weights.parent),
        )
        stored.add(name)
    return stored


def _optimize(model: ir.Model, stored: set[str]) -> None:
    """Fold constants (shape arithmetic), drop dead nodes and common subexpressions; never fold an op that
    reads a weight: that would copy the weight into the ONNX file (onnxruntime folds those at load).
    (onnxscript's full optimizer also reads every weight to de-duplicate it: 15x slower for no gain.)"""
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(v is not None and v.name in stored for v in node.inputs) else None

    passes = ir.passes.Sequential(
        common.InlinePass(),
        _constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=8192, output_size_limit=262144, should_fold=should_fold
        ),
        common.RemoveUnusedNodesPass(),
        common.CommonSubexpressionEliminationPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
    )
    passes(model)
