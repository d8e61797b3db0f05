"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""

    exit_code = 2  # a stop the user asked for says 130, as a shell does
