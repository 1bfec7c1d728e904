"""The one exception type for mistakes a user can make (a bad path, key, value or shape), the
checks every reader of a user's path makes first (`special_file_kind`, and `path_problem` for a path
no file system takes), and the sentence every writer of a user's file gives when the disk or folder
refuses it (`writing`).

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


MAX_PATH_BYTES = 4096  # Linux's PATH_MAX: no longer path names a file
MAX_PATH_DEPTH = 256  # folders in a path: beyond it os.makedirs recurses towards Python's limit, and nobody means it


def path_problem(path: str) -> Optional[str]:
    """Why `path` cannot name a file, in words ("is empty", "holds a NUL character", ...), or None."""
    if not path.strip():
        return "is empty"
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:  # a lone surrogate from a \udXXX escape: no file name can hold it
        return "holds a character no file name can hold (a lone UTF-16 surrogate)"
    if "\0" in path:
        return "holds a NUL character"
    if size > MAX_PATH_BYTES:
        return f"is {size} bytes long, more than the {MAX_PATH_BYTES} a path may have"
    depth = len([part for part in path.split(os.sep) if part])
    if depth > MAX_PATH_DEPTH:
        return f"is {depth} folders deep, more than the {MAX_PATH_DEPTH} this project creates"
    return None


def existing_parent(path: str, option: str) -> None:
    """Refuse, in one sentence naming `option` (e.g. "--out"), a path to write into a folder that does not
    exist, or one no file system takes: a command creates the file or folder it is asked for, never the
    folders above it (`export --out /nonexistent/m.onnx` must not make /nonexistent)."""
    problem = path_problem(path)
    if problem is not None:
        raise UserError(f"{option} {path[:80]!r} {problem}; pass a plain path.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{option} {path}: its folder {parent} does not exist; create it first, or pass another {option}.")


@contextmanager
def writing(path: str, advice: Union[str, Callable[[], str]]):
    """Around a write of `path`: an OSError (a full disk, a folder we may not write) becomes one sentence
    naming the file and ending with `advice`, a string or a function that gives it when the write fails."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); {advice() if callable(advice) else advice}.") from None
