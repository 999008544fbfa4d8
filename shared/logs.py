"""The app's loggers: every module's logger comes from `get_logger`, which passes each record through one sanitiser.

Ids and outside text reach log lines as arguments (`log.info("batch %s: %s", batch_id, reason)`); the sanitiser
escapes control characters and line separators in the message and in every argument and caps each argument's
length (`redact.printable`), so a newline in an id cannot forge a log line and a NUL cannot make a log binary.
`tests/test_code_shape.py` finds any logger made another way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared.redact import printable

MAX_ARG = 1000
MAX_MESSAGE = 4000


def _clean(value: Any) -> Any:
    if isinstance(value, int | float | bool) or value is None:
        return value  # `%d` and `%.1f` need the number itself
    return printable(str(value), MAX_ARG)


class Sanitiser(logging.Filter):
    """Rewrites a record's message and arguments in place; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(str(record.msg), MAX_MESSAGE)
        if isinstance(record.args, Mapping):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_clean(a) for a in record.args)
        return True


SANITISER = Sanitiser()


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if SANITISER not in logger.filters:
        logger.addFilter(SANITISER)
    return logger
