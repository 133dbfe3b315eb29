"""The one exception type users see, and the range check every counting option shares."""


class AuditError(Exception):
    """A problem with the user's input or environment.

    The message is a single line that names the file, the line or field, and
    what to do. The command line prints it to stderr and exits with code 2,
    never a traceback.
    """


def require_positive(option: str, value: int | float | None, what: str = "number") -> None:
    """An option that counts something: None means its default, but 0 or a negative value is an error."""
    if value is not None and value < 1:
        raise AuditError(f"{option} {value}: give a positive {what} (leave the option out for its default)")
