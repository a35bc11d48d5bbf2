"""How a command ends: one line on stderr, a typed exit code, signals that work.

Every failure is reported as one line, ``ferry: error: <what happened>``, with
the traceback only under ``--debug``. Exception groups from task groups are
unwrapped to the ferry error inside them. SIGINT and SIGTERM cancel the
command's main task (a second signal cancels it again), so every ``async with``
on the way out runs (QEMU, mounts, namespaces and temporary directories are
removed), and the command exits 130 or 143.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable

from ferry.aio import log_task_stacks
from ferry.cli.exitcodes import ExitCode
from ferry.errors import (
    AuthenticationError,
    BrokenResourceError,
    ConfigError,
    FerryError,
    IntegrityError,
    PeerError,
    RemoteProtocolError,
)

log = logging.getLogger("ferry")

# "vm x: vm x: ..." and "... (phase p) (phase p)": one layer wraps another's message.
_REPEATED_PREFIX = re.compile(r"(\b[\w.?-]+ [\w.?/-]+: )\1+")
_REPEATED_SUFFIX = re.compile(r"( \([^()]+\))\1+")

# After a signal, the main task is cancelled again this often until it ends.
RECANCEL_S = 3.0


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code docs/cli.md gives for ``exc``."""
    from ferry.oci.errors import ImageIntegrityError
    from ferry.package.errors import PackageFormatError, PackageTamperedError, SignatureError
    from ferry.s3.errors import ObjectCorruptError, S3AuthError, S3UnreachableError

    if isinstance(exc, PackageTamperedError | PackageFormatError | SignatureError
                  | ObjectCorruptError):
        return ExitCode.INTEGRITY  # a package or an S3 object that does not verify
    if isinstance(exc, S3AuthError | S3UnreachableError):
        return ExitCode.PEER  # the S3 endpoint refused our credentials or did not answer
    if isinstance(exc, ImageIntegrityError):
        return ExitCode.INTEGRITY  # an image blob that does not match its digest
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE
    if isinstance(exc, IntegrityError):
        return ExitCode.INTEGRITY
    if isinstance(exc, PeerError | BrokenResourceError | AuthenticationError
                  | RemoteProtocolError):
        return ExitCode.PEER  # the peer refused us, went away, or sent what we refuse
    if isinstance(exc, FerryError) and exc.__cause__ is not None:
        return exit_code_for(exc.__cause__)
    return ExitCode.ERROR


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def primary(exc: BaseException) -> BaseException:
    """The one exception that says what happened: the first ferry error in a group."""
    found = leaves(exc)
    for leaf in found:
        if isinstance(leaf, FerryError):
            return leaf
    for leaf in found:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return found[0]


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, each thing said once."""
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__
    elif not isinstance(exc, FerryError):
        # Not ours: say what kind of failure it was (an OSError's text alone can be vague).
        text = f"{type(exc).__name__}: {text}"
    text = _REPEATED_PREFIX.sub(r"\1", text)
    return _REPEATED_SUFFIX.sub(r"\1", text)


def report(exc: BaseException, *, debug: bool) -> ExitCode:
    """Print ``exc`` as one line (and its traceback under ``debug``); return the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    err = primary(exc)
    if isinstance(err, FerryError):
        sys.stderr.write(f"ferry: error: {one_line(err)}\n")
        return exit_code_for(err)
    sys.stderr.write(f"ferry: internal error: {one_line(err)}"
                     f"{'' if debug else ' (run with --debug for the traceback)'}\n")
    return ExitCode.ERROR


def _interrupted(exc: BaseException) -> bool:
    return any(isinstance(leaf, KeyboardInterrupt | asyncio.CancelledError)
               for leaf in leaves(exc))


def run_command(main: Callable[[], Awaitable[int]], *, debug: bool = False) -> int:
    """Run ``main`` in a fresh event loop and turn however it ends into an exit code."""
    received: list[int] = []

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def recancel() -> None:
            # Code on the way out may have swallowed a cancellation (a bare
            # ``except CancelledError``, a shielded wait): cancel again until it ends.
            if not task.done():
                task.cancel()
                loop.call_later(RECANCEL_S, recancel)

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                sys.stderr.write(f"ferry: {signal.Signals(signum).name} received, "
                                 "cleaning up\n")
                loop.call_later(RECANCEL_S, recancel)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        # kill -USR1: where every task and thread waits, on stderr (a command that hangs).
        loop.add_signal_handler(signal.SIGUSR1, log_task_stacks, log)
        try:
            code = await main()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        if received:
            # Something on the way swallowed the cancellation: the signal still decides.
            raise asyncio.CancelledError
        return code

    try:
        return int(asyncio.run(guarded()))
    except (KeyboardInterrupt, asyncio.CancelledError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and not _interrupted(exc):
            return report(exc, debug=debug)
        if received and received[0] == signal.SIGTERM:
            sys.stderr.write("ferry: terminated\n")
            return ExitCode.TERMINATED
        sys.stderr.write("ferry: interrupted\n")
        return ExitCode.INTERRUPTED
    except Exception as exc:
        return report(exc, debug=debug)
