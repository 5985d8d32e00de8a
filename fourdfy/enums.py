"""``StrChoice``: the base of every choice-typed config value and name of the project.

A ``str`` enum. Config choices name each member by its value: OmegaConf/Hydra look a value up by member name, so
``field.kind=dense`` on the command line, in a preset and in an old ``config.yaml`` all resolve, and a
misspelt value fails at compose time listing the valid ones. A member equals and hashes as its string, so
``json.dumps`` (run fingerprints) writes the plain value and code comparing with strings keeps working;
``str()`` and f-strings give the bare value on every Python version (``enum.StrEnum`` is 3.11+ only).
"""

from __future__ import annotations

from enum import Enum


class StrChoice(str, Enum):
    """A str enum whose str() and format() are its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
