"""The one user-facing error type.

Every failure a user can cause (bad shape, missing file, model/checkpoint mismatch, NaN
statistics, unknown name) raises `OscarError` with one sentence saying what is wrong and what
to do; the CLI prints it and exits with status 2.
"""


class OscarError(ValueError):
    """A user-facing error whose message is one actionable sentence."""
