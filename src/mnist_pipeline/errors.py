"""The one exception a user sees: the CLI prints it as a single line and exits with its code."""


class PipelineError(Exception):
    """A problem the user can fix, said in the message; exit_code 2: bad input, 1: work failed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(PipelineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` (its type name when empty)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
