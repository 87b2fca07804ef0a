"""Command-line parsing for ``tprun`` and ``tpcompile``: a usage error is one line, ``PROG: error: MESSAGE``.

click answers a bad option with a usage block, a "Try --help" line and the message; these commands print
only the message (``--help`` still prints the help).  Invariant: an error found while parsing reaches the
user as exactly one line on stderr and exit code 2 (click's own exit code for other click errors), and
parsing runs before the command body imports anything heavy (torch), so it answers at once.  SIGTERM
raises :class:`~tpcompile.runtime.errors.Terminated` from the start (see
:mod:`~tpcompile.runtime.launch.lifetime`), so both commands clean up after it as after Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from click.exceptions import NoArgsIsHelpError

from .errors import Terminated, first_line
from .launch.lifetime import stop_on_sigterm
from .reporting import EXIT_INTERRUPTED, EXIT_TERMINATED

__all__ = ["OneLineErrors", "fail"]


def fail(prog: str, message: str, code: int) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` (its first line) on stderr and exit with ``code``."""
    print(f"{prog}: error: {first_line(Exception(message))}", file=sys.stderr, flush=True)
    sys.exit(code)


class OneLineErrors:
    """Mixin for a ``click.Command`` or ``click.Group``: parse errors as one line (see the module).

    ``prog`` is the name the errors start with (the console script's name, also under ``python -m``).
    """

    prog = ""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        stop_on_sigterm()  # SIGTERM is cleaned up after like Ctrl-C (the bodies catch KeyboardInterrupt)
        try:
            result = super().main(  # type: ignore[misc]
                args, prog_name or self.prog, complete_var, standalone_mode=False, **extra
            )
        except NoArgsIsHelpError as exc:  # the bare command: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(self.prog, exc.format_message(), exc.exit_code)
        except click.exceptions.Abort as exc:  # Ctrl-C or SIGTERM that the command body did not catch
            if isinstance(exc.__context__, Terminated):
                fail(self.prog, "terminated", EXIT_TERMINATED)
            fail(self.prog, "interrupted", EXIT_INTERRUPTED)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)
