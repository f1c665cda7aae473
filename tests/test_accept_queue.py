"""A worker's accept queue is part of its load (work stealing must not fill a worker whose
kernel queue already holds connections it has not accepted)."""

from __future__ import annotations

import socket

from tidegate.engine.netopt import accept_queue_length
from tidegate.engine.supervisor import WorkerSlot


def test_accept_queue_length_counts_what_nobody_accepted() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        assert accept_queue_length(listener) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        assert accept_queue_length(listener) == 5
        accepted = [listener.accept()[0] for _ in range(2)]
        assert accept_queue_length(listener) == 3
        for s in clients + accepted:
            s.close()
    assert accept_queue_length(listener) == 0  # closed: nothing to tell, no exception


def test_a_slots_load_counts_its_accept_queue() -> None:
    slot = WorkerSlot(index=0)
    slot.stats = {"active": 100, "accept_queue": 40}
    assert slot.load() == 140
    slot.stats = {"active": 100}  # a worker that does not report it (handoff mode, old stats)
    assert slot.load() == 100
