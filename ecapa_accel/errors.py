"""The one exception type for mistakes a user can make (the CLI maps it to exit status 2)."""


class UserError(Exception):
    """A bad config, CSV, path, key or resume request; the message is one line naming the culprit."""
