"""Write a random-weight, Llama-shaped Hugging Face checkpoint of a given size, one tensor at a time.

::

    python bench/make_checkpoint.py OUT_DIR [--size-gb 4.2] [--shard-gb 2.0] [--seed 0]

The shape is TinyLlama-1.1B's (hidden 2048, intermediate 5632, 32 heads over 4 KV heads, vocabulary 32000,
untied ``lm_head``) with as many layers as it takes to reach ``--size-gb`` GiB of fp32 weights. OUT_DIR gets
``config.json``, ``generation_config.json``, ``model-0000i-of-0000n.safetensors`` shards and
``model.safetensors.index.json``; no tokenizer (the compiler does not need one).

Memory: the parameter list comes from a model built on the meta device, and each tensor is generated
(``torch.randn`` seeded per tensor) only when the streaming writer reaches it, so at most one tensor lives
in memory at a time (plus the writer's transient ``tobytes()`` copy of it: peak ~ interpreter + 2 x the
largest tensor). Prints a JSON summary (sizes, largest tensor) on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpcompile.artifact.safetensors_writer import write_safetensors  # noqa: E402

GIB = 1 << 30
#: Llama shape without the layer count (TinyLlama-1.1B's).
SHAPE: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
INIT_STD = 0.02

Spec = tuple[str, torch.dtype, tuple[int, ...]]


def _config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **SHAPE)


def parameter_specs(layers: int) -> list[Spec]:
    """(name, dtype, shape) of every fp32 parameter of the Llama model with ``layers`` layers, in module
    order, read from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(layers), dtype=torch.float32)
    return [(name, torch.float32, tuple(p.shape)) for name, p in model.named_parameters()]


def _nbytes(spec: Spec) -> int:
    return math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()


def layers_for(size_bytes: int) -> int:
    """The smallest layer count whose checkpoint holds at least ``size_bytes`` bytes."""
    fixed = sum(_nbytes(s) for s in parameter_specs(0))
    per_layer = sum(_nbytes(s) for s in parameter_specs(1)) - fixed
    return max(1, math.ceil((size_bytes - fixed) / per_layer))


def split_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Group consecutive tensors into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def random_tensor(spec: Spec, index: int, seed: int) -> torch.Tensor:
    """Tensor number ``index``: ones for norm weights (1-d), N(0, 0.02) otherwise; seeded per tensor."""
    _, dtype, shape = spec
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, dtype=dtype, generator=gen).mul_(INIT_STD)


def write_checkpoint(out: Path, size_gib: float, shard_gib: float = 2.0, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint to ``out`` (created; must be empty or absent) and return a summary."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"make_checkpoint: {out} is not empty")
    layers = layers_for(int(size_gib * GIB))
    config = _config(layers)
    config.save_pretrained(str(out))  # config.json
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    specs = parameter_specs(layers)
    index_of = {spec[0]: i for i, spec in enumerate(specs)}
    by_name = {spec[0]: spec for spec in specs}
    shards = split_shards(specs, int(shard_gib * GIB))
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(
            out / fname, shard, lambda name: random_tensor(by_name[name], index_of[name], seed)
        )
        weight_map.update({spec[0]: fname for spec in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    largest = max(specs, key=_nbytes)
    return {
        "path": str(out),
        "layers": layers,
        "parameters": sum(math.prod(s[2]) for s in specs),
        "total_bytes": total,
        "shards": len(shards),
        "largest_tensor": largest[0],
        "largest_tensor_bytes": _nbytes(largest),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (created; must be empty)")
    parser.add_argument("--size-gb", type=float, default=4.2, help="minimum fp32 weight size in GiB")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = write_checkpoint(args.out, args.size_gb, args.shard_gb, args.seed)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
