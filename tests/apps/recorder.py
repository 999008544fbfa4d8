"""Shared by the test apps: append one JSON line per event to the file named by RECORD_FILE."""

import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()


def record(**event: Any) -> None:
    event.setdefault("t", time.monotonic())
    event.setdefault("thread", threading.current_thread().name)
    line = json.dumps(event, default=str)
    with _lock, open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as fh:  # noqa: PTH123
        fh.write(line + "\n")
