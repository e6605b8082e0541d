"""Errors raised for bad user input, named so that the CLI can print them without a traceback."""


class CapfleetError(ValueError):
    """A problem with the user's input or configuration; the message says what and where."""


class DataError(CapfleetError):
    """A data file is malformed; the message names the file (and line, where there is one)."""


def check_at_least(config, names: tuple[str, ...], low: int) -> None:
    """Refuse a config whose named fields fall below `low`, naming the first that does."""
    for name in names:
        value = getattr(config, name)
        if value < low:
            raise CapfleetError(f"{name}: must be >= {low}, got {value}")


def check_range(config, limits: dict[str, tuple[float, float]]) -> None:
    """Refuse a field outside its [low, high], naming it: values beyond what makes sense (or
    beyond what the outputs store) are refused before any work, not met after hours of it."""
    for name, (low, high) in limits.items():
        value = getattr(config, name)
        if value < low:
            raise CapfleetError(f"{name}: must be >= {low}, got {value}")
        if value > high:
            raise CapfleetError(f"{name}: must be <= {high}, got {value}")


def check_numbers(config) -> None:
    """Every float field finite (NaN compares false with every bound, so it would pass them
    all), every int field within 64 bits."""
    import dataclasses
    import math

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CapfleetError(f"{f.name}: must be a finite number, got {value}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise CapfleetError(f"{f.name}: out of range, got {value}")


SEED_RANGE = (0, 2**31 - 1)  # seeds are stored as int32 (variants.parquet)
THREADS_RANGE = (0, 1024)
