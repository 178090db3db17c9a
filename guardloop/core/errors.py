"""Errors a user or operator can fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Anything the user can fix; printed as one line."""
