"""The one exception type for bad input: its message is a single line a user can act on."""


class UserError(Exception):
    """Bad input (a path, a config value, a checkpoint) that the user can fix.

    The CLI prints `error: <message>` and exits non-zero without a traceback, so the message names
    the file or key at fault and what was expected.
    """
