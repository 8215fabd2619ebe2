"""Errors that are the user's to fix; the command line prints them as one line."""


class UserError(Exception):
    """A mistake in arguments, paths or data that the user can correct."""
