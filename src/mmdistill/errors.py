"""User-facing errors: raised for bad input and printed by the CLI as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (file, key, value). The message names the culprit."""
