"""The exceptions that the CLI turns into one line and an exit code (2 for bad input)."""


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


class ReportedElsewhere(Exception):
    """A multi-process run that ended with `exit_code`: its rank 0 already printed `message` (or
    nothing, for a success-less launcher failure). The CLI exits with the code and prints nothing more."""

    def __init__(self, message: str | None, exit_code: int) -> None:
        super().__init__(message or f"exit code {exit_code}")
        self.message, self.exit_code = message, exit_code
