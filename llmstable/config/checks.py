"""What every config schema uses to validate itself: the error that lists every problem, and small checks whose
messages name the key, the bad value, what is allowed and the fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run. The message lists every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def positive(problems: list[str], key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and value <= 0:
        problems.append(f"{key}={value} must be > 0")


def choice(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def divisors_near(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]
