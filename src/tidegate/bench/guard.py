"""Tie a child process's life to the bench runner's.

The runner starts the server as ``python -m tidegate.bench.guard RUNNER_PID -- CMD...``: the guard
asks the kernel to send SIGTERM when the runner dies (``PR_SET_PDEATHSIG``, kept across exec),
then execs the command in place, so a killed runner never leaves a server behind. The client
processes call :func:`die_with_parent` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have ``sig`` sent to this process when its parent dies; exit now if it already has.

    Returns False where the kernel call is not available (the caller then relies on its pipes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the call above took effect
        os._exit(1)
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tidegate.bench.guard PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    die_with_parent(int(argv[0]))
    command = argv[2:]
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
