"""Seeing inside: diagnostics that cost nothing on the hot path.

- :mod:`tidegate.observe.histogram`: a fixed-bucket, mergeable histogram (per-worker snapshots).
- :mod:`tidegate.observe.metrics`: ``/metrics``, the supervisor's Prometheus view of its workers.
- :mod:`tidegate.observe.stall`: a loop-stall watchdog thread and a loop-lag histogram.
- :mod:`tidegate.observe.leaks`: task creation-site tracking and a task/connection leak report,
  dumped to the log on SIGUSR1.
- :mod:`tidegate.observe.trace`: a bounded lifecycle event ring per worker, exported as Chrome
  Trace Event Format JSON (opens in the Perfetto UI).

Each of the last three is independent and says how to wire it in its "Wiring:" section.
"""
