"""The one exception type for user-facing errors."""


class EnsError(Exception):
    """A problem with the user's input (a file, an id, an option), not a bug in ens.

    The message is one line that names the file, id or key at fault. The command line prints
    it and exits with status 2; ``--debug`` shows the traceback instead.
    """
