"""The one exception type users see, and the range check every counting option shares."""


class AuditError(Exception):
    """A problem with the user's input or environment.

    The message is a single line that names the file, the line or field, and
    what to do. The command line prints it to stderr and exits with code 2,
    never a traceback. A line break or other control character that reaches
    the message from the input (a field name, a file name) is written as its
    escape, so the message stays one line whatever the input holds.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(_one_line(str(message)), *args)


def _one_line(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def require_positive(option: str, value: int | float | None, what: str = "number") -> None:
    """An option that counts something: None means its default, but 0 or a negative value is an error."""
    if value is not None and value < 1:
        raise AuditError(f"{option} {value}: give a positive {what} (leave the option out for its default)")
