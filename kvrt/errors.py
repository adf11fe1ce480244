"""The error types kvrt raises for bad input: the CLI prints the message as one line and exits with `exit_code`."""


class KvrtError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""

    exit_code = 1


class InvalidValue(KvrtError):
    """A value the user gave is out of its domain (sampling values, cache specs, an empty or
    undecodable prompt): exit 2, as click does for its own usage errors."""

    exit_code = 2
