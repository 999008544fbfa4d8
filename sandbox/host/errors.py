"""Errors of the local Functions host."""


class HostStartupError(Exception):
    """A user error found at start-up: one line that names the file, the setting or the binding."""
