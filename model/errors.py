"""Errors raised for bad user input, named so that the CLI can print them without a traceback."""


class CapfleetError(ValueError):
    """A problem with the user's input or configuration; the message says what and where."""


class DataError(CapfleetError):
    """A data file is malformed; the message names the file (and line, where there is one)."""
