"""The one exception type for bad user input.

Anything a user can fix (a missing file, a corrupt NIfTI, a wrong label value, an
unknown case in a CSV) raises :class:`InputError` with a one-line message that names
the file and what is wrong. The ``mstkd`` command turns it into ``error: <message>``
on stderr and exit status 2; every other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input that the user can fix; the message is one line, naming the file."""
