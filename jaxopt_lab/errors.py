"""The one exception type for mistakes a user can fix (bad config, data, checkpoint, CLI argument).

The CLI prints its message as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A one-line, user-facing error that names the culprit and what is allowed."""
