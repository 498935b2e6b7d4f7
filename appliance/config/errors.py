"""Configuration problems, each naming the file, line, field (and tunnel) and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem in a config file.

    ``path`` is the field in dotted form (``tunnels.to-b.ike.proposals[0]``); ``tunnel`` the
    tunnel's name when the problem is inside one; ``line`` is 1-based (0: not tied to a line).
    """

    file: str
    line: int
    path: str
    message: str
    tunnel: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "path": self.path, "tunnel": self.tunnel,
                "message": self.message}


class ConfigError(Exception):
    """The configuration is invalid; ``issues`` lists every problem found (not just the first)."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class ConfigReadError(ConfigError):
    """The configuration file could not be read at all (missing, not a file, permission)."""
