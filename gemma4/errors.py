"""Error types shared by the model, conversion, chat and harness code.

Anything the user can fix (a bad config field, a missing tensor, an unreadable file) raises
:class:`InvalidInputError`; the CLI turns it into a one-line message and exit code 2.
"""


class InvalidInputError(ValueError):
    """Input the user supplied is invalid; the message names the file, field, tensor or flag."""


class ConfigError(InvalidInputError):
    """A model config is unsupported or inconsistent; the message names the field."""
