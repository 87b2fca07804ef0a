"""``tprun serve OUT``: the command line of the OpenAI-compatible server (``tprun`` hands ``serve ...`` here).

Invariant: options are parsed before torch or the web stack is imported, so a usage error is one line at
once (exit 2), like every ``tprun`` option error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..launch.options import RankOptions, rank_options
from ..reporting import report_exception
from ..usage import OneLineErrors

__all__ = ["serve_command"]


class _TprunServe(OneLineErrors, click.Command):
    prog = "tprun serve"


@click.command(cls=_TprunServe, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request.")
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="requests that may wait for a free slot; beyond them requests get 429.",
)
@click.option("--served-model-name", help="the model's name in the API (default: OUT's directory name).")
@click.option(
    "--shutdown-timeout",
    "shutdown_timeout_s",
    type=click.FloatRange(min=0.0),
    default=30.0,
    show_default=True,
    help="on SIGTERM / Ctrl-C: seconds the running requests get to finish before they are cancelled.",
)
@rank_options
def serve_command(
    artifact: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int,
    served_model_name: str | None,
    shutdown_timeout_s: float,
    ranks: RankOptions,
) -> None:
    """Serve the causal-LM artifact ARTIFACT (compiled with --max-batch-size B > 1) over OpenAI's HTTP API,
    answering up to B requests at once."""
    from .server import ServeOptions, serve

    options = ServeOptions(
        artifact=artifact,
        ranks=ranks,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        shutdown_timeout_s=shutdown_timeout_s,
        served_model_name=served_model_name,
    )
    try:
        rc = serve(options)
    except (Exception, KeyboardInterrupt) as exc:
        rc = report_exception(exc, debug=ranks.debug)
    # everything is cleaned up by now (ranks reaped, socket directory removed): skip the interpreter's
    # teardown of torch and transformers, which takes seconds and would delay a supervisor's restart
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
