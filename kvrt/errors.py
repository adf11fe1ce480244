"""The one error type kvrt raises for bad input: the CLI prints its message as one line."""


class KvrtError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""
