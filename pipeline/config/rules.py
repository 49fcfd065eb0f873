"""What a param may be: numeric ranges and choices, declared beside each field of the schema."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

# Keys of a dataclass field's metadata.
RULE = "range"
CHOICES = "choices"


@dataclass(frozen=True)
class Range:
    """What a numeric param may be: an integer or a finite number within bounds."""

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    why: str = ""
    optional: bool = False  # null (None) is allowed too
    example: Any = None  # shown in the fix when the param has no default to show

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"<= {self.hi:g}")
        text = kind + (" " + " and ".join(bounds) if bounds else "")
        if self.optional:
            text += " (or null)"
        return text + (f" ({self.why})" if self.why else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def positive_int(why: str, example: Any = None) -> Range:
    return Range(True, 1, why=why, example=example)


def count(why: str) -> Range:
    return Range(True, 0, why=why)


def fraction(why: str) -> Range:
    return Range(False, 0, 1, why=why)


def ranged(default: Any, rule: Range) -> Any:
    """A dataclass field with its default and its allowed range."""
    return field(default=default, metadata={RULE: rule})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A dataclass field with its default and the strings it may be."""
    return field(default=default, metadata={CHOICES: choices})


def collect(cls: Any, key: str, prefix: str = "") -> dict[str, Any]:
    """The `key` metadata of every field of a config dataclass, nested ones included, by
    dotted name, in field order."""
    found: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            found |= collect(hints[f.name], key, name + ".")
        elif key in f.metadata:
            found[name] = f.metadata[key]
    return found
