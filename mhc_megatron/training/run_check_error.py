"""The exception of the pre-run checks (its own module, so every check module can raise it)."""


class RunCheckError(RuntimeError):
    """A run that must not start (or go on); the message says what to change."""
