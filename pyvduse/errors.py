"""Errors a user can cause, each carrying the one line that tells them what to do."""


class UserError(Exception):
    """A mistake or missing prerequisite on the user's side; printed as one line, no traceback."""

    exit_code = 2
