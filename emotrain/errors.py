"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
