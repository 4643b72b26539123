"""Errors a user can act on. The CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Something the user supplied is wrong (path, file, setting); the message says what and how to fix it."""


class HFFormatError(UserError, ValueError):
    """A Hugging Face checkpoint directory is missing a file or disagrees with its config."""
