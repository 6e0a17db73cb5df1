"""The one exception type for problems a user can fix (bad config, missing file, wrong name).

The CLI prints its message on one line and exits with status 2, never a traceback. Raise it with a message
that names the problem and, where there is one, what would be accepted instead.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear message (CLI exit status 2)."""
