"""A rank's ``program.pt2`` read straight into the module the runtime runs, in a fraction of the time
``torch.export.load(path).module()`` takes.

``torch.export.load`` rebuilds a whole ExportedProgram: every value's shape as a fake tensor with
symbolic sizes, every JSON object as a schema dataclass, and it imports torch._dynamo to do it. A rank
only runs the graph, so it needs none of that: for a 30-layer SmolLM2 rank (2,400 nodes) on a 2-core host
the first load drops from ~7 s to well under one, and tprun's start-up with it.

:func:`read_program` reads the archive's JSON graph directly and builds the same
:class:`torch.fx.GraphModule` as ``ExportedProgram.module()`` does: the same nodes in the same order, with
the same names, targets, args and kwargs (arguments split into positional and keyword ones by the
operator's schema, as torch's deserializer does); parameters and buffers become ``get_attr`` nodes on
meta tensors (the weights file supplies the values); a tuple or a single tensor is returned.

Invariant: it either returns that module, or ``None`` for any archive outside the subset it knows, and
:func:`program_module` then loads with torch: another schema major version, sample inputs (``module()``
builds its input checks from them), constants, custom objects, higher-order ops, mutated buffers or
inputs, inputs or outputs that are not flat tensors, weights stored with their values, an argument or
output kind it does not decode, an operator torch does not have. It executes nothing from the archive
and unpickles nothing: targets resolve only to ``torch.ops`` overloads and the ``operator`` functions of
symbolic shapes. The module runs no input checks (a rank's inputs are built by the runtime itself).
"""

from __future__ import annotations

import json
import keyword
import operator
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx

__all__ = ["program_module", "read_program"]

#: The ``torch.export`` schema major version this reader knows (torch/_export/serde/schema.py).
SCHEMA_MAJOR = 8

# schema.ScalarType / Layout / MemoryFormat codes
_DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_LAYOUTS = {7: torch.strided}
_MEMORY_FORMATS = {
    1: torch.contiguous_format,
    2: torch.channels_last,
    3: torch.channels_last_3d,
    4: torch.preserve_format,
}
_POSITIONAL, _KEYWORD = 1, 2  # schema.ArgumentKind

#: The ``operator`` functions a graph of symbolic shapes calls (serialized as ``_operator.<name>``).
_SYM_OPERATORS: dict[str, Callable[..., Any]] = {
    name: getattr(operator, name)
    for name in (
        "eq",
        "ne",
        "le",
        "ge",
        "lt",
        "gt",
        "neg",
        "pos",
        "mul",
        "add",
        "sub",
        "floordiv",
        "mod",
        "pow",
        "truediv",
        "and_",
        "or_",
        "lshift",
        "rshift",
    )
}
#: The one ATen op torch's deserializer reads like those (positional arguments, not by its schema).
_ITEM = "torch.ops.aten.item.default"


class _Unsupported(Exception):
    """The archive uses something this reader does not know: load it with torch instead."""


def program_module(path: str | Path) -> torch.nn.Module:
    """The module of the program archive at ``path``: :func:`read_program`'s, else torch's
    (``torch.export.load(path).module()``, whose deserializer is imported only then)."""
    module = read_program(path)
    if module is not None:
        return module
    from .exported_load import load_exported

    return load_exported(path).module()


def read_program(path: str | Path) -> fx.GraphModule | None:
    """The module ``torch.export.load(path).module()`` would give, or ``None`` (see the module docstring).

    Raises only what reading the zip file raises (``OSError``, ``zipfile.BadZipFile``)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        models = [n for n in names if n.endswith("/models/model.json")]
        if len(models) != 1:
            return None
        root = models[0][: -len("models/model.json")]
        samples = root + "data/sample_inputs/model.pt"
        if samples in names and archive.getinfo(samples).file_size:  # torch would check calls against them
            return None
        try:
            program = json.loads(archive.read(models[0]))
            weights = _config(archive, names, root + "data/weights/model_weights_config.json")
            constants = _config(archive, names, root + "data/constants/model_constants_config.json")
            if constants:
                return None
            return _build(program, weights)
        except (_Unsupported, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError):
            return None


def _config(archive: zipfile.ZipFile, names: list[str], entry: str) -> dict[str, Any]:
    if entry not in names:
        return {}
    config: dict[str, Any] = json.loads(archive.read(entry))["config"]
    return config


def _one(union: dict[str, Any]) -> tuple[str, Any]:
    """A serialized union (``{"as_tensor": {...}}``): its one (kind, value)."""
    if not isinstance(union, dict) or len(union) != 1:
        raise _Unsupported(union)
    ((kind, value),) = union.items()
    return kind, value


def _op(target: str) -> Any:
    """``torch.ops.<ns>.<op>.<overload>`` or ``_operator.<name>``, and nothing else."""
    parts = target.split(".")
    if len(parts) == 2 and parts[0] == "_operator" and parts[1] in _SYM_OPERATORS:
        return _SYM_OPERATORS[parts[1]]
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        raise _Unsupported(target)
    packet = getattr(getattr(torch.ops, parts[2]), parts[3])  # raises AttributeError if unknown
    overload = getattr(packet, parts[4])
    if not isinstance(overload, torch._ops.OpOverload):
        raise _Unsupported(target)
    return overload


def _tree(spec: str) -> Any:
    """A serialized pytree spec (``[1, {...}]``, protocol 1) as its dict."""
    version, tree = json.loads(spec)
    if version != 1:
        raise _Unsupported(spec)
    return tree


def _is_leaf(tree: Any) -> bool:
    return tree["type"] is None and not tree["children_spec"]


def _check_specs(program: dict[str, Any], user_inputs: int, user_outputs: int) -> bool:
    """The call takes the user inputs flat and positionally, and returns a tuple of them or one tensor;
    True for one tensor."""
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    args, kwargs = _tree(signature["in_spec"])["children_spec"]
    if args["type"] != "builtins.tuple" or kwargs["type"] != "builtins.dict" or kwargs["children_spec"]:
        raise _Unsupported("inputs")
    if len(args["children_spec"]) != user_inputs or not all(map(_is_leaf, args["children_spec"])):
        raise _Unsupported("inputs")
    out = _tree(signature["out_spec"])
    if _is_leaf(out):
        if user_outputs != 1:
            raise _Unsupported("outputs")
        return True
    leaves = [_is_leaf(c) for c in out["children_spec"]]
    if out["type"] != "builtins.tuple" or leaves != [True] * user_outputs:
        raise _Unsupported("outputs")
    return False


def _meta_tensor(meta: dict[str, Any]) -> torch.Tensor:
    """A weight stored as tpcompile stores them: its shape only (the rank's weights file has the values)."""
    if meta["layout"] != 7 or meta["device"]["type"] != "meta" or meta["storage_offset"] != {"as_int": 0}:
        raise _Unsupported(meta)
    sizes = [_one(s) for s in meta["sizes"]]
    strides = [_one(s) for s in meta["strides"]]
    if any(kind != "as_int" for kind, _ in sizes + strides):
        raise _Unsupported(meta)
    return torch.empty_strided(
        [v for _, v in sizes], [v for _, v in strides], dtype=_DTYPES[meta["dtype"]], device="meta"
    )


class _GraphBuilder:
    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.values: dict[str, fx.Node] = {}

    def _named(self, name: str, node: fx.Node) -> fx.Node:
        if name in self.values:
            raise _Unsupported(f"{name} defined twice")
        node.name = name  # as torch's deserializer does: the serialized name, verbatim
        self.values[name] = node
        return node

    def placeholder(self, name: str) -> fx.Node:
        return self._named(name, self.graph.placeholder(name))

    def argument(self, union: dict[str, Any]) -> Any:
        kind, value = _one(union)
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self.values[value["name"]]
        if kind == "as_float":  # JSON has no infinities: torch writes them as "Infinity", "-Infinity", "NaN"
            return float(value)
        if kind == "as_floats":
            return [float(v) for v in value]
        if kind in ("as_int", "as_bool", "as_string"):
            return value
        if kind in ("as_ints", "as_bools", "as_strings"):
            return list(value)
        if kind == "as_tensors":
            return [self.values[t["name"]] for t in value]
        if kind == "as_optional_tensors":
            return [None if k == "as_none" else self.values[v["name"]] for k, v in map(_one, value)]
        if kind in ("as_sym_int", "as_sym_bool"):
            return self._symbolic(value)
        if kind in ("as_sym_ints", "as_sym_bools"):
            return [self._symbolic(v) for v in value]
        if kind == "as_scalar_type":
            return _DTYPES[value]
        if kind == "as_layout":
            return _LAYOUTS[value]
        if kind == "as_memory_format":
            return _MEMORY_FORMATS[value]
        if kind == "as_device":
            index = value.get("index")
            return torch.device(value["type"]) if index is None else torch.device(value["type"], index)
        raise _Unsupported(kind)

    def _symbolic(self, union: dict[str, Any]) -> Any:
        kind, value = _one(union)
        if kind == "as_name":
            return self.values[value]
        if kind in ("as_int", "as_bool"):
            return value
        raise _Unsupported(kind)

    def _schema_arguments(
        self, target: torch._ops.OpOverload, inputs: list[dict[str, Any]]
    ) -> tuple[Any, Any]:
        """Positional and keyword arguments by the op's schema (torch's ``deserialize_inputs``)."""
        kinds = {i["name"]: i["kind"] for i in inputs}
        given = {i["name"]: self.argument(i["arg"]) for i in inputs}
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for schema_arg in target._schema.arguments:
            name = schema_arg.name
            if name in given:
                if kinds[name] == _POSITIONAL:
                    args.append(given[name])
                    continue
                if kinds[name] == _KEYWORD and not keyword.iskeyword(name):
                    kwargs[name] = given[name]
                    continue
            if not schema_arg.has_default_value() and not schema_arg.kwarg_only:
                args.append(given[name])
            elif keyword.iskeyword(name):
                raise _Unsupported(name)
            elif name in given:
                kwargs[name] = given[name]
        return tuple(args), kwargs

    def node(self, serialized: dict[str, Any]) -> None:
        target = _op(serialized["target"])
        inputs, outputs, name = serialized["inputs"], serialized["outputs"], serialized.get("name")
        if not name:
            raise _Unsupported("an unnamed node")
        if not isinstance(target, torch._ops.OpOverload) or serialized["target"] == _ITEM:
            args: tuple[Any, ...] = tuple(self.argument(i["arg"]) for i in inputs)
            call = self.graph.create_node("call_function", target, args, {}, name)
            (only,) = outputs
            kind, value = _one(only)
            if kind not in ("as_sym_int", "as_sym_bool") or _one(value)[0] != "as_name":
                raise _Unsupported(kind)
            self._named(_one(value)[1], call)
            return
        args, kwargs = self._schema_arguments(target, inputs)
        call = self.graph.create_node("call_function", target, args, kwargs, name)
        if not outputs:
            return
        if len(outputs) == 1:
            kind, value = _one(outputs[0])
            if kind == "as_tensor":
                self._named(value["name"], call)
                return
            if kind in ("as_sym_int", "as_sym_bool"):
                self._named(value["as_name"], call)
                return
            if kind != "as_tensors":
                raise _Unsupported(kind)
            items = [("as_tensor", v) for v in value]
        else:
            items = [_one(o) for o in outputs]
        for index, (kind, value) in enumerate(items):  # torch's generate_getitems, for tensors
            if kind != "as_tensor":
                raise _Unsupported(kind)
            item = self.graph.create_node(
                "call_function", operator.getitem, (call, index), name=value["name"]
            )
            self._named(value["name"], item)


def _build(program: dict[str, Any], weights: dict[str, Any]) -> fx.GraphModule:
    if program["schema_version"]["major"] != SCHEMA_MAJOR:
        raise _Unsupported("schema version")
    serialized = program["graph_module"]["graph"]
    signature = program["graph_module"]["signature"]
    if serialized["custom_obj_values"]:
        raise _Unsupported("custom objects")

    builder = _GraphBuilder()
    lifted: dict[str, tuple[str, bool, bool]] = {}  # placeholder -> (fqn, is a parameter, persistent)
    user_inputs = 0
    inputs, specs = serialized["inputs"], signature["input_specs"]
    if len(inputs) != len(specs):
        raise _Unsupported("input specs")
    for graph_input, spec in zip(inputs, specs, strict=True):
        kind, value = _one(graph_input)
        spec_kind, spec_value = _one(spec)
        if kind != "as_tensor":
            raise _Unsupported(kind)
        name = value["name"]
        if spec_value["arg"] != (
            {"name": name} if spec_kind != "user_input" else {"as_tensor": {"name": name}}
        ):
            raise _Unsupported("input specs")
        if spec_kind == "parameter":
            lifted[name] = (spec_value["parameter_name"], True, True)
        elif spec_kind == "buffer":
            lifted[name] = (spec_value["buffer_name"], False, bool(spec_value["persistent"]))
        elif spec_kind == "user_input":
            user_inputs += 1
        else:
            raise _Unsupported(spec_kind)
        builder.placeholder(name)

    for node in serialized["nodes"]:
        builder.node(node)

    outputs = [builder.argument(o) for o in serialized["outputs"]]
    for spec in signature["output_specs"]:
        if _one(spec)[0] != "user_output":
            raise _Unsupported("mutated buffers or inputs")
    if len(signature["output_specs"]) != len(outputs) or serialized["is_single_tensor_return"]:
        raise _Unsupported("outputs")
    single = _check_specs(program, user_inputs, len(outputs))
    graph = builder.graph
    graph.output(outputs[0] if single else tuple(outputs))

    # ExportedProgram.module(): each lifted placeholder becomes a get_attr of its attribute, right after it
    module = torch.nn.Module()
    for placeholder in list(graph.find_nodes(op="placeholder")):
        if placeholder.name not in lifted:
            continue
        fqn, is_parameter, persistent = lifted[placeholder.name]
        with graph.inserting_after(placeholder):
            attr = graph.get_attr(fqn)
        placeholder.replace_all_uses_with(attr)
        graph.erase_node(placeholder)
        meta = weights[fqn]["tensor_meta"]
        _register(module, fqn, _meta_tensor(meta), is_parameter, bool(meta["requires_grad"]), persistent)
    graph.lint()
    return fx.GraphModule(module, graph)


def _register(
    module: torch.nn.Module, fqn: str, tensor: torch.Tensor, is_parameter: bool, grad: bool, persistent: bool
) -> None:
    *path, field = fqn.split(".")
    owner = module
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if is_parameter:
        owner.register_parameter(field, torch.nn.Parameter(tensor, requires_grad=grad))
    else:
        owner.register_buffer(field, tensor, persistent=persistent)
