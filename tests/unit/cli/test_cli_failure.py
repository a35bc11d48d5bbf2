"""How ferry commands end: one-line errors, exit codes, signals (real processes)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ferry.cli.exitcodes import ExitCode
from ferry.cli.failure import exit_code_for, one_line, primary, report, run_command
from ferry.cli.main import build_parser, main, split_rest
from ferry.errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    MigrationError,
    PeerError,
    RemoteProtocolError,
)
from ferry.vm.errors import SnapshotError


def test_group_is_unwrapped_to_the_ferry_error() -> None:
    inner = SnapshotError("the guest agent did not come up", vm="redis")
    group = BaseExceptionGroup("tg", [asyncio.CancelledError(),
                                      ExceptionGroup("inner", [inner])])
    assert primary(group) is inner


def test_message_says_each_thing_once() -> None:
    exc = MigrationError("vm a: vm a: the link broke (phase precopy) (phase precopy)")
    assert one_line(exc) == "vm a: the link broke (phase precopy)"


def test_message_is_one_line() -> None:
    assert one_line(ConfigError("bad\nconfig\n  here")) == "bad config here"


def test_foreign_errors_name_their_kind() -> None:
    text = one_line(FileNotFoundError(2, "No such file"))
    assert text == "FileNotFoundError: [Errno 2] No such file"


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("x"), ExitCode.USAGE),
    (IntegrityError("x", device="d", block=1), ExitCode.INTEGRITY),
    (PeerError("x"), ExitCode.PEER),
    (AuthenticationError("wrong token"), ExitCode.PEER),
    (RemoteProtocolError("bad frame"), ExitCode.PEER),
    (SnapshotError("x"), ExitCode.ERROR),
])
def test_exit_codes(exc: Exception, code: ExitCode) -> None:
    assert exit_code_for(exc) == code


def test_report_prints_one_line_and_markup_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    code = report(ConfigError("invalid VM id 'X': use [a-z0-9-] [/bold]"), debug=False)
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert err == "ferry: error: invalid VM id 'X': use [a-z0-9-] [/bold]\n"


def test_bug_is_reported_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    async def boom() -> int:
        raise KeyError("oops")

    assert run_command(boom) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error: KeyError" in err
    assert "--debug" in err


def test_debug_prints_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    async def boom() -> int:
        raise ConfigError("nope")

    assert run_command(boom, debug=True) == ExitCode.USAGE
    assert "Traceback" in capsys.readouterr().err


def test_split_rest() -> None:
    assert split_rest(["vm", "exec", "a", "--timeout", "5", "--", "ls", "--", "-l"]) == (
        ["vm", "exec", "a", "--timeout", "5"], ["ls", "--", "-l"])


def test_exec_options_after_the_vm_id_are_options() -> None:
    head, rest = split_rest(["vm", "exec", "a", "--timeout", "60", "--", "uname", "-a"])
    args = build_parser().parse_args(head)
    assert args.timeout == 60.0
    assert args.vm_id == "a"
    assert rest == ["uname", "-a"]


def test_unknown_option_after_the_vm_id_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["vm", "exec", "a", "ls", "-l"])
    assert info.value.code == ExitCode.USAGE
    assert "unrecognized arguments: -l" in capsys.readouterr().err


def test_rest_is_refused_where_no_command_takes_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["vm", "list", "--", "x"])
    assert info.value.code == ExitCode.USAGE


@pytest.mark.parametrize("argv", [["inspect", "f", "--block-size", "0"],
                                  ["inspect", "f", "--block-size", "-1"],
                                  ["demo", "--size-mib", "0"],
                                  ["vm", "exec", "a", "--timeout", "nan", "--", "ls"],
                                  ["vm", "run", "p", "--accel", "hvf"]])
def test_bad_numbers_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == ExitCode.USAGE


# A command that creates something, waits, and removes it on the way out.
CHILD = textwrap.dedent("""
    import asyncio, contextlib, sys
    from pathlib import Path
    from ferry.cli.failure import run_command

    marker = Path(sys.argv[1])

    @contextlib.asynccontextmanager
    async def resource():
        marker.write_text("created")
        try:
            yield
        finally:
            await asyncio.sleep(0.2)  # cleanup that itself awaits
            marker.unlink()

    async def command() -> int:
        async with resource(), asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(3600))
            print("ready", flush=True)
            {swallow}
        return 0

    sys.exit(run_command(command))
""")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("swallow", [False, True])
def test_signal_cleans_up_and_exits(tmp_path: Path, signum: int, code: int,
                                    swallow: bool) -> None:
    # swallow: the command catches the cancellation and returns normally.
    body = ("try:\n            await asyncio.sleep(3600)\n"
            "        except asyncio.CancelledError:\n            pass"
            if swallow else "await asyncio.sleep(3600)")
    script = CHILD.replace("{swallow}", body)
    marker = tmp_path / "resource"
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert marker.exists()
        sent = time.monotonic()
        proc.send_signal(signum)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == code, proc.stderr.read() if proc.stderr else ""
    assert not marker.exists()
    assert elapsed < 5  # the bound on ending after a signal
