"""Names, counts and durations as text a figure or a terminal can show, without matplotlib: the figures (plots.py)
and the command line's lines (predict, attention, features, the training report, `vit runs`) label with
it, and predict loads no matplotlib for it.
"""


def label(name):
    """A name (a class folder's, a file's) as text a figure or a terminal can show: characters that
    cannot be drawn or printed (undecodable bytes the file system handed over as surrogates, line
    breaks, control characters) become "?". For display only: the names themselves stay as they are."""
    return "".join(c if c.isprintable() else "?" for c in str(name))


def count(n: int, noun: str) -> str:
    """'1 epoch', '20 epochs'."""
    return f"{n} {noun}{'s' * (n != 1)}"


def duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"
