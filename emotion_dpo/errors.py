"""The one error type users see: a short message naming the file and key, never a deep traceback."""


class PipelineError(Exception):
    """Bad input or state the user can fix; the scripts print it and exit with status 2."""
