"""`vit init [DIR]`: a starter params.json and configs/ written from the recipes shipped inside the package.

vit/recipes/ holds params.json (the default run) and configs/ (fine-tuning, linear probe, CPU smoke, the
GPU recipes) as package data, so the installed `vit` command trains in any folder: `vit init`, then
`vit` or `vit --params configs/cpu_smoke.json`. The checkout's own params.json and configs/ are the same
files (tests/test_faults_newcomer.py keeps them equal), so `python main.py` in the checkout trains the same run.
"""

import os
from importlib import resources

from vit.errors import UserError, existing_parent, writing
from vit.files import atomic_write

RECIPES = "recipes"  # the folder inside the package


def recipes() -> dict:
    """{path relative to the starter folder: the file's bytes}: params.json and configs/*.json."""
    root = resources.files("vit") / RECIPES
    found = {"params.json": (root / "params.json").read_bytes()}
    found.update({f"configs/{f.name}": f.read_bytes() for f in (root / "configs").iterdir() if f.name.endswith(".json")})
    return found


def init(folder: str = ".") -> list:
    """Write the recipes into `folder` (created inside an existing folder); refuses to overwrite any of
    them, before writing anything. Returns the paths written."""
    files = recipes()
    existing_parent(folder, "FOLDER")
    taken = [os.path.join(folder, name) for name in files if os.path.lexists(os.path.join(folder, name))]
    if taken:
        raise UserError(f"{taken[0]} already exists{f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''}; "
                        f"init writes only files that are not there: move them away or pass another folder.")
    written = []
    for name, blob in sorted(files.items()):
        path = os.path.join(folder, name)
        with writing(path, "choose another folder or free space there"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: f.write(blob))
        written.append(path)
    return written
