"""The one exception type users see."""


class AuditError(Exception):
    """A problem with the user's input or environment.

    The message is a single line that names the file, the line or field, and
    what to do. The command line prints it to stderr and exits with code 2,
    never a traceback.
    """
