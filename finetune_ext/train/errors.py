"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """A mistake in the run's inputs (model, data, options), reported without a traceback."""
