"""The one error type the CLI turns into a clear one-line message (exit code 2, no traceback)."""


class FinetuneError(Exception):
    """Bad input: an unknown method, an unreadable data file, a directory that is not a model, ..."""
