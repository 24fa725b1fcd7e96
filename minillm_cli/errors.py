"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, model path, output dir...).

    The message is one line that names the culprit (a dotted recipe key, a file and line, a path)
    and, where it helps, what to do instead.
    """


class RunStopped(Exception):
    """A run that stopped before its end on purpose (signal) or for safety (numerics).

    The CLI prints the message and exits with `exit_code` (130 for SIGINT, 143 for SIGTERM, 1 for
    too many non-finite steps).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
