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
