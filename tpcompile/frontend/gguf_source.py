"""Read a ``.gguf`` file as a Hugging Face checkpoint, one tensor at a time.

Invariant: ``GGUFCheckpoint(path).read(name)`` is bit for bit the tensor ``name`` of the state dict that
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=file, dtype=torch.float32)`` loads from the same file,
and ``names()`` lists exactly the tensors that load takes from the file (so no ``lm_head.weight`` when the
file ties it to the embedding by storing no ``output.weight``). The file stays memory-mapped: ``names``,
``shape`` and ``dtype`` dequantize nothing, and ``read`` dequantizes only the one tensor it returns.

Names and per-tensor transforms (llama.cpp's rotary row permutation of q/k, norm offsets, ...) are the ones
transformers' legacy GGUF loader applies (``get_gguf_hf_weights_map`` on a meta-device model and
``TENSOR_PROCESSORS``); architectures whose loading merges or splits tensors are refused.

Quantized tensors can also be read *packed* (``packed_format``, ``read_packed``): the file's blocks as they
are (``runtime/format/quant_section.py``), for the 2-D tensors in a format with a kernel whose
transformers processing only reorders rows (the q/k rotary permutation is applied to the packed rows).
Invariant: decoding ``read_packed(name, ...)`` gives bit for bit the same slice of ``read(name)``. With
``dequantize=True`` nothing is offered packed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.format.quant_section import GGUF_FORMATS, QuantFormat

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_GENERATION_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


#: GGML types kept packed (a kernel reads them), by GGML type name.
PACKED_TYPES = {f.name: f for f in GGUF_FORMATS}  # the enum's names are GGML's
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class _Packed:
    format: QuantFormat
    rows: np.ndarray | None  # the file row each HF row comes from (None: the same order)


@dataclass(frozen=True)
class _Entry:
    index: int  # position in ``GGUFReader.tensors``
    gguf_name: str
    shape: tuple[int, ...]  # the HF shape, after the transformers processing


class GGUFCheckpoint:
    """A .gguf file seen as a Hugging Face checkpoint: HF config, HF names, fp32 tensors in HF layout."""

    def __init__(self, path: str | Path, dequantize: bool = False) -> None:
        self.path = Path(path)
        try:
            import gguf
            from transformers import AutoConfig, AutoModelForCausalLM
            from transformers import modeling_gguf_pytorch_utils as hf_gguf
        except ImportError as e:
            raise UsageError(
                f"reading GGUF files needs the llm extra (pip install 'tpcompile[llm]'): {e}"
            ) from e
        self._gguf: Any = gguf
        self._dequantize = gguf.quants.dequantize
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader fails in many ways on a file that is not GGUF
            raise UsageError(f"cannot read GGUF file {self.path}: {first_line(e)}") from e
        arch = self._field("general.architecture")
        if not isinstance(arch, str):
            raise UsageError(
                f"cannot read GGUF file {self.path}: no general.architecture, not a model checkpoint"
            )
        self._check_architecture(arch)

        try:
            with self._shared_parse():
                self.config: PretrainedConfig = AutoConfig.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name
                )
        except (ValueError, KeyError, NotImplementedError, OSError) as e:
            raise UnsupportedModelError(
                f"transformers cannot build a config from {self.path} (architecture {arch}): {first_line(e)}"
            ) from e
        try:
            with torch.device("meta"):  # only the parameter names are needed: allocate nothing
                skeleton = AutoModelForCausalLM.from_config(self.config)
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(
                f"{self.path}: transformers has no causal-LM model for architecture {arch}: {first_line(e)}"
            ) from e

        processor_class = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)
        self._processor = processor_class(config=self.config.to_dict())
        try:
            # the file's architecture picks gguf's tensor map (transformers' model_type aliases lead there)
            with self._shared_parse():
                self._mapping: dict[str, str] = hf_gguf.get_gguf_hf_weights_map(
                    skeleton, self._processor, model_type=arch
                )
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: no GGUF tensor-name map for {arch}: {first_line(e)}"
            ) from e
        self._entries = self._index(arch)
        self._check_quantizations()
        self._packed: dict[str, _Packed] = {}
        #: quantized tensors read as floats for want of a kernel for their format: name -> (type, file bytes)
        self.unpacked: dict[str, tuple[str, int]] = {}
        for name, entry in self._entries.items():
            kind = self._reader.tensors[entry.index].tensor_type.name
            packed = None if dequantize else self._packable(entry)
            if packed is not None:
                self._packed[name] = packed
            elif kind not in _FLOAT_TYPES and not dequantize:
                self.unpacked[name] = (kind, int(self._reader.tensors[entry.index].n_bytes))

    # -- the tensor-source interface -------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        self._entries[name]  # noqa: B018 - KeyError for a name the file does not hold
        return torch.float32

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        tensor = self._reader.tensors[entry.index]
        processed = self._process(entry.gguf_name, self._dequantize(tensor.data, tensor.tensor_type))
        assert processed is not None and processed[0] == name, f"{entry.gguf_name} no longer loads as {name}"
        value = _owned_float32(processed[1])
        if tuple(value.shape) != entry.shape:
            raise UnsupportedModelError(
                f"{self.path}: tensor {entry.gguf_name} dequantized to shape {tuple(value.shape)}, "
                f"expected {entry.shape}"
            )
        return torch.from_numpy(value)

    def packed_format(self, name: str) -> QuantFormat | None:
        """The block format ``name`` can be read packed in, or None (read it as floats)."""
        packed = self._packed.get(name)
        return None if packed is None else packed.format

    def read_packed(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """The packed blocks of ``read(name).narrow(dim, start, length)``: a ``uint8`` tensor ``[rows,
        blocks * block_bytes]``; a slice of the input dim (``dim`` 1) must start and end on block
        boundaries."""
        packed = self._packed[name]
        fmt = packed.format
        data = self._reader.tensors[self._entries[name].index].data
        if dim == 0:
            rows = (
                np.arange(start, start + length)
                if packed.rows is None
                else packed.rows[start : start + length]
            )
            return torch.from_numpy(np.ascontiguousarray(data[rows]))
        if dim != 1 or start % fmt.block or length % fmt.block:
            raise UnsupportedModelError(
                f"{self.path}: slice [{start}:{start + length}] of dim {dim} of {name} cuts its "
                f"{fmt.value} blocks of {fmt.block}"
            )
        lo, hi = fmt.packed_cols(start), fmt.packed_cols(start + length)
        block = data[:, lo:hi] if packed.rows is None else data[packed.rows, lo:hi]
        return torch.from_numpy(np.ascontiguousarray(block))

    def save_tokenizer(self, out_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            with self._shared_parse():
                tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except (ValueError, KeyError, NotImplementedError, OSError) as e:
            raise UnsupportedModelError(
                f"transformers cannot build a tokenizer from {self.path}: {first_line(e)}"
            ) from e
        template = self._field("tokenizer.chat_template")
        if getattr(tokenizer, "chat_template", None) is None and isinstance(template, str):
            tokenizer.chat_template = template
        tokenizer.save_pretrained(str(out_dir))

    def generation_defaults(self) -> dict[str, int]:
        found = {key: self._field(field) for key, field in _GENERATION_KEYS.items()}
        return {key: int(value) for key, value in found.items() if isinstance(value, (int, np.integer))}

    # -- building the index ----------------------------------------------------------------------------

    def _field(self, key: str) -> Any:
        field = self._reader.get_field(key)
        return None if field is None else field.contents()

    @contextmanager
    def _shared_parse(self) -> Iterator[None]:
        """While transformers reads this file (config, tokenizer) or maps its names, reuse the work done here.

        transformers imports ``GGUFReader`` and ``get_tensor_name_map`` from ``gguf`` at call time. Parsing
        the metadata (the vocabulary and merges above all) takes seconds per reader, so it gets the reader
        already open here; ``get_gguf_hf_weights_map`` rebuilds the whole-model name map for every submodule
        (quadratic in the layer count), so it gets a cached one. Both are only read by the caller. Should
        transformers bind them differently, this merely stops saving time.
        """
        gguf = self._gguf
        make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        here = self.path.resolve()

        def reader(path: str | Path, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs and Path(path).resolve() == here:
                return self._reader
            return make_reader(path, *args, **kwargs)

        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map

    def _check_architecture(self, arch: str) -> None:
        """Refuse the architectures transformers loads through weight conversions (not per tensor)."""
        try:
            from transformers.integrations.gguf import is_gguf_arch_supported
        except ImportError:  # transformers from before that loading path: every architecture is legacy
            return
        if is_gguf_arch_supported(arch):
            raise UnsupportedModelError(
                f"{self.path}: transformers loads GGUF architecture {arch} through weight conversions, "
                "which tpcompile cannot yet apply one tensor at a time; use a safetensors checkpoint"
            )

    def _index(self, arch: str) -> dict[str, _Entry]:
        feeds: dict[str, list[str]] = {}
        for tensor in self._reader.tensors:
            if tensor.name in self._mapping:
                feeds.setdefault(self._mapping[tensor.name], []).append(tensor.name)
        merged = sorted(hf for hf, sources in feeds.items() if len(sources) > 1)
        if merged:
            raise UnsupportedModelError(
                f"{self.path}: transformers builds {merged[0]} ({arch}) from several GGUF tensors "
                f"({', '.join(feeds[merged[0]])}), which tpcompile cannot read one tensor at a time"
            )
        entries: dict[str, _Entry] = {}
        for index, tensor in enumerate(self._reader.tensors):
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF stores ne, innermost first
            # Run the processor on a zero-stride stand-in: it yields the HF name and shape and reads no data.
            stand_in = np.lib.stride_tricks.as_strided(
                np.zeros(1, np.float32), shape=shape, strides=(0,) * len(shape), writeable=False
            )
            processed = self._process(tensor.name, stand_in)
            if processed is None:
                continue  # transformers drops it too (e.g. llama.cpp's rope_freqs)
            name, value = processed
            if name in entries:
                raise UnsupportedModelError(
                    f"{self.path}: GGUF tensors {entries[name].gguf_name} and {tensor.name} "
                    f"both load as {name}"
                )
            entries[name] = _Entry(index, tensor.name, tuple(int(d) for d in value.shape))
        if not entries:
            raise UnsupportedModelError(f"{self.path}: no GGUF tensor maps to a {arch} model parameter")
        return entries

    def _check_quantizations(self) -> None:
        """Dequantize one row of the first tensor of each GGML type, to refuse an unknown type up front."""
        seen: set[int] = set()
        for entry in self._entries.values():
            tensor = self._reader.tensors[entry.index]
            if int(tensor.tensor_type) in seen:
                continue
            seen.add(int(tensor.tensor_type))
            try:
                self._dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], tensor.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {tensor.name} is quantized as {tensor.tensor_type.name}, which the "
                    f"installed gguf package cannot dequantize ({first_line(e)})"
                ) from e

    def _packable(self, entry: _Entry) -> _Packed | None:
        """How ``entry`` reads packed: its format and row order, or None when it cannot (no kernel for its
        type, not 2-D, or a transformers processing other than a reordering of whole rows)."""
        tensor = self._reader.tensors[entry.index]
        fmt = PACKED_TYPES.get(tensor.tensor_type.name)
        if fmt is None or len(entry.shape) != 2:
            return None
        rows, cols = entry.shape
        data = tensor.data
        if data.shape != (rows, fmt.packed_cols(cols)) or cols % fmt.block:
            return None
        # Probe the processing with distinct values per row and column: a pure row reordering gives a
        # permutation of the rows back, with every row intact.
        probe = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
        try:
            processed = self._process(entry.gguf_name, probe)
        except Exception:  # a processor that needs the real shape: not a plain reordering
            return None
        if processed is None:
            return None
        out = np.asarray(processed[1])
        if out.shape != (rows, 2) or not np.array_equal(out[:, 1], out[:, 0] + 1) or np.any(out[:, 0] % 2):
            return None
        order = (out[:, 0] // 2).astype(np.int64)
        if not np.array_equal(np.sort(order), np.arange(rows)):
            return None
        return _Packed(fmt, None if np.array_equal(order, np.arange(rows)) else order)

    def _process(self, gguf_name: str, weights: np.ndarray) -> tuple[str, np.ndarray] | None:
        """Apply transformers' per-tensor GGUF processing: the HF name and value, or None if it is dropped."""
        aside: dict[str, dict[str, Any]] = {"tensors": {}}  # where a processor stores a tensor it renames
        with np.errstate(all="ignore"):  # stand-ins are zeros: e.g. Mamba's log(-A) warns on them
            result = self._processor.process(
                weights=weights, name=gguf_name, tensor_key_mapping=self._mapping, parsed_parameters=aside
            )
        if result.name is not None:
            name = self._mapping.get(result.name)
            return None if name is None else (name, result.weights)
        stored = aside["tensors"]
        if len(stored) > 1:
            raise UnsupportedModelError(
                f"{self.path}: transformers splits GGUF tensor {gguf_name} into {len(stored)} tensors, "
                "which tpcompile cannot read one tensor at a time"
            )
        if not stored:
            return None
        ((name, value),) = stored.items()
        return name, value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _owned_float32(value: np.ndarray) -> np.ndarray:
    """``value`` as a C-contiguous, writeable float32 array holding its own memory (never the file's)."""
    base: Any = value
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    private = base is None  # the chain of views ends in an array allocated here, not in the mapped file
    if private and value.dtype == np.float32 and value.flags.c_contiguous and value.flags.writeable:
        return value
    return np.array(value, dtype=np.float32, order="C", copy=True)
