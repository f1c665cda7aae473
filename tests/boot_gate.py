"""An RPC handler module whose import waits while the file named by $TIDEGATE_TEST_BOOT_GATE
exists. Workers import it while they boot (``--rpc-handler boot_gate:rpc``), so a test can
hold a restarted worker down for as long as it needs, without timing anything."""

from __future__ import annotations

import os
import time
from typing import Any

_gate = os.environ.get("TIDEGATE_TEST_BOOT_GATE", "")
while _gate and os.path.exists(_gate):
    time.sleep(0.05)


def rpc(session: Any, method: str, data: bytes) -> bytes:
    return data
