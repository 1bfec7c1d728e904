"""The one exception type for mistakes a user can make (a bad path, key, value or shape), the
check every reader of a user's path makes first (`special_file_kind`), and the sentence every writer
of a user's file gives when the disk or folder refuses it (`writing`).

Its message is a single sentence that names the file, key or value and says what to do;
the command line (vit/cli.py) prints it without a traceback. It is a ValueError, as transformers' and
timm's refusals are, so `except ValueError` in a library user's code catches it. Bugs in this project
stay ordinary exceptions.
"""

import os
import stat
from contextlib import contextmanager
from typing import Callable, Optional, Union


class UserError(ValueError):
    """A problem with the user's input, explained in one sentence."""


class PeerLost(UserError):
    """Another process of a distributed run is gone (its node died, was killed or lost the network):
    every surviving rank says so in one sentence, not only rank 0 (which may be the one that died)."""


# os.stat's verdicts on what is neither a regular file nor a folder
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISSOCK, "a socket"))


def special_file_kind(path: str) -> Optional[str]:
    """"a FIFO", "a character device", "a block device" or "a socket" when `path` is one, else None (a
    regular file, a folder, or nothing at all). From os.stat alone: opening a FIFO waits for a writer
    forever, and reading /dev/zero never ends, so readers ask this before they open anything."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable, or a name with a NUL byte: the caller's own check says so
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), None)


@contextmanager
def writing(path: str, advice: Union[str, Callable[[], str]]):
    """Around a write of `path`: an OSError (a full disk, a folder we may not write) becomes one sentence
    naming the file and ending with `advice`, a string or a function that gives it when the write fails."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); {advice() if callable(advice) else advice}.") from None
