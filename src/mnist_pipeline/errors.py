"""The one exception type a user ever sees: the CLI prints it as a single line."""


class PipelineError(Exception):
    """A problem the user can fix; `str(err)` says what is wrong and how to fix it.

    exit_code 2 means bad input (params, flags), 1 a failure while doing the work.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(PipelineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
