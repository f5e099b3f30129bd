"""The one base class of errors a user can cause and fix: the CLI prints them as one line."""


class UserError(ValueError):
    """A problem the user can fix (bad path, bad key, bad value); its message names the fix."""
