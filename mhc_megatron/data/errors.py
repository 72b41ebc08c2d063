"""User-facing errors of the preprocessing: printed as ``error: ...`` without a traceback."""


class PreprocessError(Exception):
    """A user-facing error: bad arguments or bad input. Printed without a traceback."""


class BadInputFile(PreprocessError):
    """An input file that cannot be used (corrupt, unreadable, empty or without usable text).

    Unlike the other errors this one is about the file's contents, so ``--skip-bad-files`` can
    leave the file out instead of stopping the run.
    """

    def __init__(self, path: str, reason: str) -> None:
        """Make the error ``input file '<path>' <reason>``.

        Args:
            path: The input file.
            reason: What is wrong with it, phrased to follow the file name (e.g. ``"is empty"``).
        """
        super().__init__(f"input file {path!r} {reason}")
        self.path = path
        self.reason = reason
