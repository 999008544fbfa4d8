"""The app's loggers escape what outside text could do to a log: forge a line, make it binary, flood it."""

from __future__ import annotations

import logging

import pytest

from shared import logs


def test_ids_and_outside_text_reach_the_log_escaped_and_capped(caplog: pytest.LogCaptureFixture) -> None:
    log = logs.get_logger("shared.test_logs")
    with caplog.at_level(logging.INFO, logger="shared.test_logs"):
        log.info("batch %s: %d ids, %s", "b-1\nINFO forged line", 3, "\x00\x1b[2J" + "x" * 5000)
        log.warning("keyed %(id)s", {"id": "in_1\r\nERROR forged"})
        log.error("an error whose text holds a newline:\n%s", "\u2028next")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("batch b-1\\nINFO forged line: 3 ids, \\x00\\x1b[2J")
    assert len(lines[0]) < logs.MAX_ARG + 100
    assert lines[1] == "keyed in_1\\r\\nERROR forged"
    assert lines[2] == "an error whose text holds a newline:\\n\\u2028next"
    assert not [line for line in lines if any(ord(c) < 32 for c in line)]


def test_the_sanitiser_is_attached_once_however_often_a_logger_is_asked_for() -> None:
    first = logs.get_logger("shared.test_logs_once")
    logs.get_logger("shared.test_logs_once")
    assert first.filters.count(logs.SANITISER) == 1
