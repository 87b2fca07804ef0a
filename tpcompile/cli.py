"""The ``tpcompile`` command: compile (the default), ``verify`` and ``explain``.

Exit codes (``tpcompile.errors.EXIT_*``): 0 ok, 1 internal error or failed verification, 2 usage / bad
input, 3 unsupported model, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); either way the compile's
worker processes and working directory are gone when it exits.  Options are parsed before torch is
imported (the modules imported at the top are torch-free), so a usage error is one line at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from tpcompile.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    TpCompileError,
    UsageError,
)
from tpcompile.progress import ProgressBar
from tpcompile.runtime.errors import LaunchError, RuntimeArtifactError, Terminated, and_more, first_line
from tpcompile.runtime.launch.lifetime import end_process, exit_status
from tpcompile.runtime.usage import OneLineErrors

if TYPE_CHECKING:
    from tpcompile.frontend.options import LanguageModelOptions
    from tpcompile.frontend.quantize import QuantizeOptions
    from tpcompile.plan.spec import PlanFile


DTYPES = ("fp32", "bf16", "fp16")


def choice_option(*decls: str, choices: Iterable[str], default: str, help: str) -> Any:
    """An option taking one of ``choices`` (shown with its default in --help)."""
    kind = click.Choice(list(choices))
    return click.option(*decls, type=kind, default=default, show_default=True, help=help)


class DefaultGroup(OneLineErrors, click.Group):
    """``tpcompile MODEL ...`` means ``tpcompile compile MODEL ...``; usage errors are one line."""

    prog = "tpcompile"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


def _fail(err: TpCompileError, debug: bool) -> None:
    if debug:
        raise err
    click.echo(f"tpcompile: error: {err}", err=True)
    sys.exit(err.exit_code)


def _run(debug: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TpCompileError as err:
        _fail(err, debug)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): OUT was left as it was
        if isinstance(exc, Terminated):
            click.echo("tpcompile: error: terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        click.echo("tpcompile: error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except RuntimeArtifactError as err:  # `verify` runs the artifact: the runtime's one-line errors
        if debug:
            raise
        click.echo(f"tpcompile: error: {first_line(err)}", err=True)
        code = err.exit_code if isinstance(err, LaunchError) else None  # a rank's, 130, 143: the job's
        sys.exit(code or EXIT_USAGE)
    except Exception as err:
        if debug:
            raise
        first = first_line(err)
        click.echo(f"tpcompile: internal error: {type(err).__name__}: {first} (rerun with --debug)", err=True)
        sys.exit(EXIT_INTERNAL)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tpcompile")
def main() -> None:
    """Compile a PyTorch program into per-rank tensor-parallel artifacts.

    \b
    tpcompile MODEL --tp N -o OUT        compile (MODEL: a Hugging Face checkpoint directory, a .gguf
                                         file, a .pt2 from torch.export.save, or pkg.module:factory)
    tpcompile verify OUT --reference MODEL
    tpcompile explain OUT
    tpcompile plan MODEL --tp 1,2,4,8 --profile h100-nvlink   predict each tp (no weights written)
    """


@main.command("compile")
@click.argument("model")
@click.option("--tp", type=int, required=True, help="Number of tensor-parallel ranks (>= 1).")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path),
    help="JSON plan: parameter glob -> colwise | rowwise | replicate.",
)
@click.option(
    "--strict-plan",
    is_flag=True,
    help="A --plan pattern that decides no parameter (a typo) is an error, not a warning.",
)
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled model (runs its code).")
@choice_option(
    "--dtype", choices=DTYPES, default="fp32",
    help="Weight and activation dtype (Hugging Face checkpoints and GGUF files).",
)  # fmt: skip
@click.option("--max-seq-len", type=int, help="KV cache length (default: min(model limit, 4096)).")
@click.option("--max-batch-size", type=int, default=1, show_default=True, help="Sequences per step.")
@click.option(
    "--dequantize",
    is_flag=True,
    help="GGUF: store quantized weights as --dtype floats (by default Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K "
    "stay packed in the shards and run on quantized-weight kernels).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    help="Float checkpoints: store the linear weights quantized (weight-only): int8 has one symmetric scale "
    "per output row, int4 an fp16 scale and minimum per --group-size inputs.",
)
@click.option(
    "--group-size",
    type=int,
    help="--quantize int4: inputs per group, 32 (default), 64 or 128.",
)
@click.option(
    "--quantize-embeddings",
    is_flag=True,
    help="--quantize: also quantize the embedding table (and an lm_head tied to it).",
)
@choice_option(
    "--moe",
    choices=("tp", "ep"),
    default="tp",
    help="Mixture-of-experts layers: tp splits every expert like an MLP; ep gives each rank whole experts "
    "(uneven counts allowed). Either way one all-reduce per MoE block.",
)
@choice_option(
    "--format",
    "artifact_format",
    choices=("torch", "onnx"),
    default="torch",
    help="Rank programs as torch.export programs, or as ONNX segments cut at the collectives "
    "(run by onnxruntime; needs the onnx extra).",
)
@choice_option(
    "--comm-dtype", choices=DTYPES, default="fp32",
    help="Dtype of the all-reduce payloads: bf16 or fp16 halve the bytes each all-reduce sends (summed in "
    "fp32, rounded once; logits move by about the dtype's rounding: see `tpcompile verify`); fp32: as they "
    "are. Not with --format onnx.",
)  # fmt: skip
@click.option(
    "--profile",
    "profile_name",
    help="Weigh the exact plans on this hardware profile (a shipped name, `host` after `tprun calibrate`, or "
    "a .toml file) and keep the one the cost model predicts fastest: e.g. over gloo or Ethernet a chain "
    "kept whole saves its all-reduce. `tpcompile explain` lists the plans weighed.",
)
@click.option(
    "--native/--no-native",
    default=True,
    show_default=True,
    envvar="TPCOMPILE_NATIVE",
    help="Also compile each rank's program to native code (AOTInductor, ~30-60 s per rank) that tprun "
    "runs without a Python call per op; the eager program stays as the fallback. TPCOMPILE_NATIVE=0 "
    "makes --no-native the default.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compile_cmd(
    model: str,
    tp: int,
    out: Path,
    plan_path: Path | None,
    strict_plan: bool,
    trust_pickle: bool,
    dtype: str,
    max_seq_len: int | None,
    max_batch_size: int,
    dequantize: bool,
    quantize: str | None,
    group_size: int | None,
    quantize_embeddings: bool,
    moe: str,
    artifact_format: str,
    comm_dtype: str,
    profile_name: str | None,
    native: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Compile MODEL for TP ranks into OUT."""
    from tpcompile.frontend.options import LanguageModelOptions

    lm = LanguageModelOptions(dtype, max_seq_len, max_batch_size, dequantize)
    _run(
        debug, _compile, model, tp, out, plan_path, trust_pickle, lm, force, as_json, quiet, moe,
        artifact_format, strict_plan, native, _quantize_options(quantize, group_size, quantize_embeddings),
        comm_dtype, profile_name,
    )


def _quantize_options(kind: str | None, group_size: int | None, embeddings: bool) -> Any:
    """The ``QuantizeOptions`` of ``--quantize`` (None without it); a ``UsageError`` raised here is
    reported when ``_compile`` runs (a deferred raise keeps ``_run``'s error handling)."""
    from tpcompile.frontend.quantize import QuantizeOptions, quantize_format

    if kind is None:
        if group_size is not None or embeddings:
            flag = "--group-size" if group_size is not None else "--quantize-embeddings"
            return UsageError(f"{flag} applies only with --quantize")
        return None
    try:
        return QuantizeOptions(quantize_format(kind, group_size), embeddings)
    except UsageError as err:
        return err


def _compile(
    model: str,
    tp: int,
    out: Path,
    plan_path: Path | None,
    trust_pickle: bool,
    lm: LanguageModelOptions,
    force: bool,
    as_json: bool,
    quiet: bool,
    moe: str = "tp",
    artifact_format: str = "torch",
    strict_plan: bool = False,
    native: bool = True,
    quantize: QuantizeOptions | UsageError | None = None,
    comm_dtype: str = "fp32",
    profile_name: str | None = None,
) -> None:
    import warnings

    from tpcompile.compiler import comm_dtype_of, compile_model
    from tpcompile.frontend import load_model
    from tpcompile.frontend.quantize import quantize_model
    from tpcompile.plan.spec import load_plan_file
    from tpcompile.runtime.format import sha256_file

    if tp < 1:
        raise UsageError(f"--tp must be at least 1 (got {tp})")
    if isinstance(quantize, UsageError):
        raise quantize
    if quantize is not None and artifact_format == "onnx":
        raise UsageError("--format onnx cannot run quantized weights yet; drop --quantize")
    comm_dtype_of(comm_dtype, artifact_format)  # a refused combination fails before the model loads
    profile = None
    if profile_name is not None:
        from tpcompile.cost.profiles import load_profile

        profile = load_profile(profile_name)
    plan_file = load_plan_file(plan_path) if plan_path else None
    if out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")

    bar = ProgressBar(tp, enabled=not quiet and not as_json, native=native and artifact_format == "torch")
    try:
        bar(f"loading {model}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captured = load_model(model, trust_pickle=trust_pickle, lm=lm)
            if quantize is not None:
                quantize_model(captured, quantize)
            if plan_file is not None:
                _check_plan(plan_file, captured.state_names().values(), strict_plan, bar)
            result = compile_model(
                captured, tp, out, plan_file=plan_file, force=force, progress=bar, moe=moe,
                format=artifact_format, native=native, comm_dtype=comm_dtype, profile=profile,
            )
        bar.close(complete=True)
    finally:
        bar.close()
    m = result.manifest
    for w in m.warnings:
        click.echo(f"tpcompile: warning: {w}", err=True)
    limited = result.plan.rank_limits  # a warning above already names these
    unsplit = {name: why for name, why in result.plan.unsplit.items() if name not in limited}
    if unsplit and not as_json:  # the whole list (with reasons) is in `tpcompile explain`
        first, reason = next(iter(sorted(unsplit.items())))
        more = f" (and {len(unsplit) - 1} more: tpcompile explain {out})" if len(unsplit) > 1 else ""
        click.echo(f"tpcompile: note: {first} stays replicated: {reason}{more}", err=True)
    if as_json:
        summary = {
            "artifact": str(out.resolve()),
            "tp": m.tp,
            "weight_bytes_per_rank": [r.weight_bytes for r in m.ranks],
            "total_weight_bytes": m.total_weight_bytes,
            "collectives": {
                op: sum(1 for c in m.collectives if c.op == op) for op in ("all_reduce", "all_gather")
            },
            "unsplit": dict(sorted(result.plan.unsplit.items())),
            "files": {
                **{f"{r.dir}/{name}": digest for r in m.ranks for name, digest in r.files.items()},
                **m.shared_files,
                "manifest.json": sha256_file(out / "manifest.json"),
            },
        }
        click.echo(json.dumps(summary, indent=1, sort_keys=True))
    else:
        n_ar = sum(1 for c in m.collectives if c.op == "all_reduce")
        n_ag = sum(1 for c in m.collectives if c.op == "all_gather")
        click.echo(
            f"wrote {out} (tp={tp}: {n_ar} all-reduce, {n_ag} all-gather; "
            f"{max(r.weight_bytes for r in m.ranks) / 2**20:.1f} MiB of weights per rank, "
            f"{m.total_weight_bytes / 2**20:.1f} MiB in all)"
        )


def _check_plan(plan_file: PlanFile, names: Iterable[str], strict: bool, bar: ProgressBar) -> None:
    """Warn about (with ``strict``: refuse) every --plan pattern that decides no parameter."""
    problems = plan_file.unused(names)
    if problems and strict:
        more = and_more(problems)
        raise UsageError(f"{problems[0]}{more}; fix the plan or drop --strict-plan")
    for problem in problems:
        bar.echo(f"tpcompile: warning: {problem}; it is ignored (--strict-plan makes this an error)")


@main.command("explain")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "profile_name",
    help="also predict the decode step on this hardware profile (see `tpcompile plan`), layer by layer.",
)
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--debug", is_flag=True)
def explain_cmd(artifact: Path, profile_name: str | None, prompt_len: int, debug: bool) -> None:
    """Print every parameter's placement, every collective and memory per rank."""
    from tpcompile.explain import explain

    def show() -> None:
        profile = None
        if profile_name is not None:
            from tpcompile.cost.profiles import load_profile

            profile = load_profile(profile_name)
        click.echo(explain(artifact, profile, prompt_len))

    _run(debug, show)


def _tp_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        tps = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not tps or min(tps) < 1:
        raise click.BadParameter(f"{value!r}: every tp must be at least 1")
    return sorted(set(tps))


@main.command("plan")
@click.argument("model")
@click.option(
    "--tp", "tps", default="1,2,4,8", show_default=True, callback=_tp_list, help="tp values, comma-separated."
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    required=True,
    help="hardware profile (repeatable): a shipped name (h100-nvlink, a100-nvlink, pcie4, "
    "h100-2hosts-100gbe, pcie4-2hosts-25gbe, rtx4090-hosts-25gbe), one `tprun calibrate` measured (host, "
    "host-gloo), "
    "or a .toml file.",
)
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True, help="for TTFT.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@choice_option(
    "--dtype", choices=DTYPES, default="bf16", help="weight dtype of the planned model (HF configs)."
)
@click.option(
    "--max-seq-len", type=click.IntRange(min=2), help="KV cache length (default: min(model limit, 4096))."
)
@click.option("--json", "as_json", is_flag=True, help="print the rows as a JSON list.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), help="write a PNG.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def plan_cmd(
    model: str,
    tps: list[int],
    profiles: tuple[str, ...],
    prompt_len: int,
    new_tokens: int,
    dtype: str,
    max_seq_len: int | None,
    as_json: bool,
    plot_path: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Predict decode speed, TTFT and memory of MODEL at each tp on each hardware profile, and recommend a tp.

    MODEL: a Hugging Face checkpoint directory, a config.json (no weights needed), a .gguf, or any model
    `tpcompile` compiles. Nothing is written but the --plot file.
    """
    _run(debug, _plan, model, tps, profiles, prompt_len, new_tokens, dtype, max_seq_len, as_json, plot_path,
         quiet)


def _plan(
    model: str,
    tps: list[int],
    profile_names: tuple[str, ...],
    prompt_len: int,
    new_tokens: int,
    dtype: str,
    max_seq_len: int | None,
    as_json: bool,
    plot_path: Path | None,
    quiet: bool,
) -> None:
    import warnings

    from tpcompile.cost.profiles import load_profile

    profiles = [load_profile(name) for name in dict.fromkeys(profile_names)]  # errors before any planning

    from tpcompile.cost.advisor import advise, format_table, plan_workloads

    def say(msg: str) -> None:
        if not quiet and not as_json:
            click.echo(f"tpcompile: {msg}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = plan_workloads(model, tps, dtype, max_seq_len, say)
    rows = advise(planned, profiles, prompt_len, new_tokens)
    if plot_path is not None:
        from tpcompile.cost.plot import plot_rows

        plot_rows(rows, plot_path, f"{Path(model).name}: predicted decode speed (batch 1, {planned.dtype})")
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=1))
    else:
        click.echo(format_table(planned, profiles, rows, prompt_len, new_tokens))
        if plot_path is not None:
            click.echo(f"wrote {plot_path}")


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", required=True, help="The original model (same forms as for compiling).")
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(path_type=Path),
    help="safetensors file of inputs; when omitted, random inputs (a language model: a prefill of "
    "random token ids at positions 0..L-1).",
)
@click.option(
    "--atol",
    type=float,
    help="Absolute tolerance [default: 1e-5; 1e-4 for a language model, whose logits sum many layers].",
)
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-pickle", is_flag=True)
@click.option("--debug", is_flag=True)
def verify_cmd(
    artifact: Path,
    reference: str,
    inputs_path: Path | None,
    atol: float | None,
    rtol: float,
    seed: int,
    trust_pickle: bool,
    debug: bool,
) -> None:
    """Run ARTIFACT on real processes and compare with the reference model's outputs (a quantized
    artifact: with the reference's weights dequantized the same way)."""
    from tpcompile.verify import verify

    report = _run(debug, verify, artifact, reference, inputs_path, atol, rtol, seed, trust_pickle)
    click.echo(report.text())
    if not report.ok:
        sys.exit(EXIT_INTERNAL)


def run() -> NoReturn:
    """The ``tpcompile`` command (its console script, and ``python -m tpcompile.cli``): :func:`main`, then
    the process ends with its status without the interpreter's teardown: neither its collections over
    every object the command left (a traced model's graphs: ~0.7 s for a tiny Llama) nor torch's and
    transformers' modules torn down one by one (~1.7 s). By then the command has written its files, or
    removed what it had half-written, and its workers have ended."""
    try:
        main()
        status = 0
    except SystemExit as done:
        status = exit_status(done)
    end_process(status)


if __name__ == "__main__":
    run()
