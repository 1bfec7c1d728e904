"""The one exception type for mistakes a user can make (a bad path, key, value or shape), and the
check every reader of a user's path makes first (`special_file_kind`).

Its message is a single sentence that names the file, key or value and says what to do;
the command line (vit/cli.py) prints it without a traceback. Bugs in this project stay ordinary exceptions.
"""

import os
import stat


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""


# os.stat's verdicts on what is neither a regular file nor a folder
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISSOCK, "a socket"))


def special_file_kind(path):
    """"a FIFO", "a character device", "a block device" or "a socket" when `path` is one, else None (a
    regular file, a folder, or nothing at all). From os.stat alone: opening a FIFO waits for a writer
    forever, and reading /dev/zero never ends, so readers ask this before they open anything."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable, or a name with a NUL byte: the caller's own check says so
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), None)
