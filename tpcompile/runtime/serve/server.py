"""The front process of ``tprun serve``: checks the artifact, serves HTTP, launches and watches the ranks.

The main thread launches the ranks (:func:`~tpcompile.runtime.launch.launcher.spawn_workers`, which
returns when they all exited, or stops them all as soon as one fails); uvicorn serves the application on
a thread of its own, on a socket bound before any rank starts (a busy port is a one-line error, exit 2).

Faults and shutdown:
- a rank that dies or hangs: the launcher (at once) or the peers' collective timeout (``--timeout``) ends
  the ranks, every open request is answered 503 and ``tprun serve`` exits with the failed rank's code;
- the first SIGTERM or Ctrl-C stops taking requests (503), lets the running ones finish for up to
  ``--shutdown-timeout`` seconds, then cancels what is left and waits for the ranks to exit: exit 0;
  a second signal (or ranks that do not exit within 10 more seconds) stops the ranks at once (exit 130
  or 143). The launcher removes the shared-memory segments; the socket's directory is removed here.
"""

from __future__ import annotations

import _thread
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..errors import LaunchError, ManifestError, Terminated
from ..launch.launcher import spawn_workers
from ..launch.options import RankOptions
from ..reporting import EXIT_OK, print_verbatim
from .link import RankLink
from .options import ServeArgs

__all__ = ["ServeOptions", "serve"]

_STOP_GRACE_S = 10.0  # after --shutdown-timeout: how long the ranks get to exit once told to stop
_HTTP_JOIN_S = 10.0
_LAST_EVENTS_S = 2.0


@dataclass(frozen=True)
class ServeOptions:
    """``tprun serve`` options."""

    artifact: Path
    ranks: RankOptions = RankOptions()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    shutdown_timeout_s: float = 30.0
    served_model_name: str | None = None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}; pass another --port") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _daemon_timer(delay_s: float, call: Callable[[], object]) -> None:
    timer = threading.Timer(delay_s, call)
    timer.daemon = True  # never keeps the process alive
    timer.start()


class _Shutdown:
    """The SIGTERM / SIGINT handler while serving: the first signal calls ``begin`` (a graceful shutdown;
    False when there is nothing to drain), any later one stops at once (see the module doc)."""

    def __init__(self, begin: Callable[[], bool]) -> None:
        self.first: int | None = None
        self.begin = begin

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.first is None and self.begin():
            self.first = signum
            return
        if (self.first or signum) == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()


def serve(options: ServeOptions) -> int:
    """Run ``tprun serve`` until it is stopped; return the exit code (raise on a failed start or rank)."""
    import uvicorn

    from ..format import load_artifact_manifest
    from ..lm.prompts import not_a_causal_lm
    from ..lm.tokenization import load_tokenizer
    from ..load.program_archive import check_artifact
    from .app import build_app
    from .service import Service

    manifest = load_artifact_manifest(options.artifact, verify=not options.ranks.skip_verify)
    lm = manifest.lm
    if not manifest.is_causal_lm or lm is None:
        raise not_a_causal_lm(manifest)
    if not lm.independent_rows:
        raise ManifestError(
            f"{manifest.path} serves one sequence at a time (compiled with --max-batch-size 1): "
            "recompile it with --max-batch-size B > 1 to serve B requests at once"
        )
    check_artifact(manifest, verify=not options.ranks.skip_verify, trust_pickle=options.ranks.trust_pickle)
    tokenizer = load_tokenizer(manifest)
    name = options.served_model_name or Path(options.artifact).resolve().name
    http = _listen(options.host, options.port)
    with tempfile.TemporaryDirectory(prefix="tprun-serve-") as tmp:
        link = RankLink(Path(tmp) / "ranks.sock")
        service = Service(name, lm, tokenizer, link, max_queue=options.max_queue, api_key=options.api_key)
        config = uvicorn.Config(
            build_app(service),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        web = threading.Thread(target=server.run, kwargs={"sockets": [http]}, name="http", daemon=True)
        web.start()
        where = f"http://{options.host}:{http.getsockname()[1]}/v1"

        def announce() -> None:
            if link.ready.wait() and link.failure is None:
                print_verbatim(f"tprun: serving {name} at {where} ({link.slots} slots, tp={manifest.tp})")

        threading.Thread(target=announce, name="announce", daemon=True).start()

        def begin_shutdown() -> bool:
            if not link.ready.is_set():
                return False  # still loading: stop at once
            service.shutting_down = True
            link.drain()
            _daemon_timer(options.shutdown_timeout_s, expire)
            return True

        def expire() -> None:
            link.stop()
            _daemon_timer(_STOP_GRACE_S, lambda: _thread.interrupt_main(signal.SIGINT))

        handler = _Shutdown(begin_shutdown)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        args = options.ranks.worker_args(
            options.artifact,
            skip_verify=True,
            serve=ServeArgs(Path(tmp) / "ranks.sock"),  # checked above
        )
        try:
            outcome = spawn_workers([args.to_json()], manifest.tp)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            link.closed.wait(_LAST_EVENTS_S)  # the events rank 0 sent before exiting reach their requests
            link.fail("the ranks stopped" if service.shutting_down else "a rank failed")
            link.ready.set()  # releases announce()
            server.should_exit = True
            web.join(_HTTP_JOIN_S)
            http.close()
    if outcome.returncode != 0:
        raise LaunchError(
            outcome.message or f"ranks exited with {outcome.returncode}", exit_code=outcome.returncode
        )
    if service.shutting_down:
        print("tprun: server stopped", file=sys.stderr, flush=True)
    return EXIT_OK
