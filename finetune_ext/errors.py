"""The exception type for user mistakes and the warning category of runs that continue after a repair."""


class UserError(ValueError):
    """A mistake in the run's inputs (model, data, options), reported without a traceback."""


class RunWarning(UserWarning):
    """Something was repaired or changed so the run could go on (a damaged checkpoint skipped, a stale lock
    taken over, an option changed on resume); the CLI prints it on one line."""
