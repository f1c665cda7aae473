"""The kernel scheduler's slice for a worker (EEVDF's per-task slice, Linux 6.12+).

When there are more busy workers than cores (here 27 on 2, forced by the 20,000-file limit),
a worker that has a heartbeat to answer waits for the others' turns on the CPU; each turn is
one slice (1.4 ms by default on this 2-core host). A shorter slice, asked for with
``sched_setattr`` (``sched_runtime`` of a SCHED_OTHER task), makes a round over the workers
shorter: each worker runs more often, in shorter pieces, with the same share of the CPU.

Python has no wrapper for ``sched_setattr``; it is called through ``ctypes``. Only x86-64 and
arm64 syscall numbers are known here; elsewhere :func:`set_slice` says it is unsupported.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # (sched_setattr, sched_getattr)
_SCHED_OTHER = 0
_ATTR_SIZE = 48  # SCHED_ATTR_SIZE_VER0: size, policy, flags, nice, priority, runtime, ...
# The kernel clamps a custom slice to 0.1..100 ms.
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def set_slice(slice_us: int, pid: int = 0) -> str | None:
    """Ask the kernel for a ``slice_us`` slice for ``pid`` (0: this process), keeping its
    policy (SCHED_OTHER) and niceness. None when done, else why not (for the log)."""
    if not MIN_SLICE_US <= slice_us <= MAX_SLICE_US:
        return f"slice {slice_us} us is outside {MIN_SLICE_US}..{MAX_SLICE_US} us"
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return f"sched_setattr is not known on {platform.machine()}"
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    # struct sched_attr (VER0): u32 size, u32 policy, u64 flags, s32 nice, u32 priority,
    # u64 runtime, u64 deadline, u64 period.
    attr = ctypes.create_string_buffer(
        struct.pack("=IIQiIQQQ", _ATTR_SIZE, _SCHED_OTHER, 0, nice, 0, slice_us * 1000, 0, 0))
    if _libc().syscall(numbers[0], pid, attr, 0) != 0:
        err = ctypes.get_errno()
        return f"sched_setattr: {os.strerror(err)}"
    return None


def slice_ns(pid: int = 0) -> int | None:
    """The slice the kernel gives ``pid`` (``se.slice`` of /proc/<pid>/sched), or None."""
    try:
        with open(f"/proc/{pid or os.getpid()}/sched", encoding="ascii") as f:
            for line in f:
                if line.startswith("se.slice"):
                    return int(line.split(":")[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
