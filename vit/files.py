"""Files in and out: writing a file so that it is whole or absent (a temp file beside it, fsync, then
a rename), and reading JSON with its nesting bounded before it is parsed.

The run's checkpoints and records (vit/train/) and the commands' outputs (vit/commands.py) write
through `atomic_write`, so a kill or a full disk never leaves a half-written file behind. Every JSON
file the project reads (params.json, an HF folder's config.json, preprocessor_config.json and shard
index) goes through `read_json`, so a file nested 100,000 deep is one sentence, not a RecursionError.
"""

import json
import os
import re
import sys
from typing import IO, Callable

from vit.errors import UserError

MAX_JSON_DEPTH = 64  # lists and objects inside one another: our files need 3, transformers' a handful
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included: its brackets are text


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


def json_depth(text: str) -> int:
    """How deep lists and objects nest in JSON `text`, counted without parsing it (strings skipped)."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(text: str, where: str, advice: str = "fix it"):
    """The JSON value in `text`, or a UserError that starts with `where` (e.g. "params file x.json") and
    ends with `advice`: invalid JSON with its line and column, nesting deeper than MAX_JSON_DEPTH (checked
    first, so the parser never recurses that far), or an integer longer than Python reads."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UserError(f"{where} nests lists or objects {depth} deep, more than the {MAX_JSON_DEPTH} this project reads; {advice}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {advice}.") from None
    except ValueError:  # an integer over Python's digit limit
        raise UserError(f"{where} holds an integer of more than {sys.get_int_max_str_digits()} digits, more than "
                        f"Python reads; {advice}.") from None


def read_json(path: str, what: str, advice: str = "fix it"):
    """The JSON value in the file `path`, read as UTF-8; errors name it as `what` `path` ("config file
    x/config.json") and end with `advice`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start} cannot be decoded); save it as UTF-8.") from None
    return parse_json(text, f"{what} {path}", advice)
