"""The one exception type for mistakes a user can make (a bad path, key, value or shape).

Its message is a single sentence that names the file, key or value and says what to do;
the command line (vit/cli.py) prints it without a traceback. Bugs in this project stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""
