"""The worker's after-boot GC set-up: frozen start-up objects, a raised young threshold, the
heap's free pages given back (so the RSS shows what is in use)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import gc
from tidegate.engine import gc_control

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

# ~30 MB of malloc'd blocks (above pymalloc's 512 B), 1 in 20 kept: the freed ones are holes
# in the heap that free() cannot hand back by itself (only a free top is trimmed).
blocks = [bytearray(1500) for _ in range(20_000)]
keep = blocks[::20]
del blocks
gc.collect()
before = rss()
stats = gc_control.configure(50_000)
after = rss()
print(before - after, gc.get_threshold()[0], gc.get_freeze_count() > 0)
"""


def test_configure_gives_the_free_heap_back_and_freezes_startup() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    released, threshold, frozen = int(out[0]), int(out[1]), out[2]
    assert released > 1_000_000, released  # the freed blocks' pages went back to the kernel
    assert threshold == 50_000 and frozen == "True"
