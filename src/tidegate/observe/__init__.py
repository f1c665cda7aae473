"""Diagnostics that cost nothing on the hot path.

Three independent modules, each wired by the worker or the supervisor (see each module's
"Wiring:" section):

- :mod:`tidegate.observe.stall`: a loop-stall watchdog thread and a loop-lag histogram.
- :mod:`tidegate.observe.leaks`: task creation-site tracking and a task/connection leak report,
  dumped to the log on SIGUSR1.
- :mod:`tidegate.observe.trace`: a bounded lifecycle event ring per worker, exported as Chrome
  Trace Event Format JSON (opens in the Perfetto UI).
"""
