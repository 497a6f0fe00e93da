"""Range checks the model config dataclasses run on construction (stdlib only: models/ stays pure torch)."""

from __future__ import annotations

from numbers import Integral


def is_int(value: object, least: int) -> bool:
    """A whole number >= `least`; a bool is not one (True would pass as 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


def derived_problems(cfg: object, *names: str) -> list[str]:
    """The data-derived sizes (in_features, out_features, ...): whole numbers >= 0 (0 until the data sets them)."""
    return [
        f"{name}: must be an integer >= 0, got {getattr(cfg, name)!r}"
        for name in names
        if not is_int(getattr(cfg, name), least=0)
    ]


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))  # one "field: problem" per line
