"""Errors raised for bad input, each naming the field or the file and line at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class TraceFormatError(ValueError):
    """A trace row is malformed; the message names the file and line."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(f"{path}:{line}: {problem}")
