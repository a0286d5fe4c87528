"""User-facing errors: the CLI prints the message on one line and exits non-zero."""


class LevanteError(Exception):
    """A mistake in the user's input (file, data, config): the message says what and where, in one line."""
