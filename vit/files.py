"""Writing a file so that it is whole or absent: a temp file beside it, fsync, then a rename.

The run's checkpoints and records (vit/train/) and the commands' outputs (vit/commands.py) write
through `atomic_write`, so a kill or a full disk never leaves a half-written file behind.
"""

import os
from typing import IO, Callable


class _Recording:
    """A file whose write errors are kept: torch.save's zip writer turns the OSError of a full disk
    into a RuntimeError ("unexpected pos ..."), and this is how atomic_write finds the OSError again."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path: str, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Call `write(f)` on a temp file in the same folder, fsync, then os.replace: never a half-written
    `path`. Any failure removes the temp file and leaves `path` as it was; a write error (disk full,
    permissions) is raised as the OSError it was, even when the writer reported it as another error."""
    tmp = path + ".tmp"
    recording = None
    try:
        with open(tmp, mode) as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and recording is not None and recording.error is not None:
            raise recording.error from None
        raise


def _fsync_dir(directory):
    # the rename itself is only durable once the folder's entry is on disk
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
