"""Personal data and credentials masked out of text before it is stored or logged: an email keeps its first letter
and domain, a phone number its last four digits (enough to find the record, not enough to contact anyone), and
anything that looks like a credential is starred.

Linear in the length of the text, whatever it holds: each pattern can start only at the beginning of a token (a
lookbehind refuses every other position at once), and nothing inside a pattern can backtrack more than once over
what it read. Phone numbers are found as maximal runs of phone characters in one pass and judged in Python.
"""

from __future__ import annotations

import re

_SEP = r"\s@\"<>()\[\],;:"  # what ends an email's local part (an apostrophe does not: o'brien@...)
_EMAIL = re.compile(rf"(?<![^{_SEP}])([^{_SEP}])[^{_SEP}]*@([A-Za-z0-9.-]+\.[A-Za-z0-9-]{{2,}})")
_PHONE_RUN = re.compile(r"(?<![\w+])(?<!\w-)\+?\d[\d\s().-]*")  # not inside an id: `INV-2026-000123`
_SECRETISH = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=: ]+|secret[\"'=: ]+|sig=|code=)([^\s\"'&,]+)")
_MIN_PHONE_DIGITS = 7


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int = 500) -> str:
    """Outside text made safe for one log line or one message: control characters and line separators escaped (a
    newline in an id or an error body cannot forge a log line, a NUL cannot make a log binary), length capped."""
    escaped = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


def mask(text: str) -> str:
    """Emails, phone numbers and anything that looks like a credential, masked."""
    text = _SECRETISH.sub(lambda m: m.group(1) + "***", text)
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    return _mask_phones(text)


def _mask_phones(text: str) -> str:
    out: list[str] = []
    done = 0
    for run in _PHONE_RUN.finditer(text):
        candidate = run.group().rstrip(" \t\r\n().-")  # a number ends with a digit
        end = run.start() + len(candidate)
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue  # glued to a word: an id, not a phone number
        digits = [c for c in candidate if c.isdigit()]
        if len(digits) >= _MIN_PHONE_DIGITS:
            out.append(text[done : run.start()])
            out.append("***" + "".join(digits[-4:]))
            done = end
    out.append(text[done:])
    return "".join(out)
