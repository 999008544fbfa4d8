"""Personal data and credentials masked out of text before it is stored or logged: an email keeps its first letter
and domain, a phone number its last four digits (enough to find the record, not enough to contact anyone), and
anything that looks like a credential is starred."""

from __future__ import annotations

import re

_EMAIL = re.compile(r"([^\s@\"<>()\[\],;:])[^\s@\"<>()\[\],;:]*@([A-Za-z0-9.-]+\.[A-Za-z0-9-]{2,})")  # ' is in names
_PHONE = re.compile(r"(?<![\w])(\+?\d[\d\s().-]{5,}\d)(?![\w])")
_SECRETISH = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=: ]+|secret[\"'=: ]+|sig=|code=)([^\s\"'&,]+)")


def mask(text: str) -> str:
    """Emails, phone numbers and anything that looks like a credential, masked."""

    def phone(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group(1))
        return f"***{digits[-4:]}" if len(digits) >= 7 else match.group(1)

    text = _SECRETISH.sub(lambda m: m.group(1) + "***", text)
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    return _PHONE.sub(phone, text)
