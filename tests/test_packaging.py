"""The package as installed and as a house: pyproject.toml and requirements.txt agree, the command line
answers as `python -m vit` and `python main.py`, `import vit` loads no torch, and the imports inside
vit/ run one way, downward through the layers, without a loop."""

import ast
import os
import re
import tomllib

import pytest

from helpers import ROOT, run_subprocess

VIT = os.path.join(ROOT, "vit")
COMMANDS = ("train", "eval", "predict", "attention", "inspect", "features", "export", "runs", "shards")

# bottom to top: a module may import only modules of lower layers, and modules of its own subpackage
LAYERS = ["vit.errors", "vit.config", "vit.run_folder", "vit.files", "vit.starter", "vit.resize", "vit.loading", "vit.outputs", "vit.layers",
          "vit.pretrained", "vit.model", "vit.data", "vit.viz", "vit.schema", "vit.params", "vit.factory", "vit.distributed", "vit.precision",
          "vit.evaluation", "vit.train", "vit.quantize", "vit.export", "vit.commands", "vit.predict", "vit.runs", "vit.cli",
          "vit.__main__"]
# stricter than the layers allow: what each part may import of the project besides itself
ONLY = {"vit.errors": set(), "vit.config": {"vit.errors"}, "vit.run_folder": set(), "vit.files": {"vit.errors"}, "vit.starter": {"vit.errors", "vit.files"},
        "vit.data": {"vit.errors"}, "vit.viz": {"vit.errors"}, "vit.resize": {"vit.errors"}, "vit.distributed": {"vit.errors"},
        "vit.precision": {"vit.errors"}, "vit.schema": {"vit.config"}}
# what inference (the commands and export) must not import: the training code, and matplotlib where no figure is drawn
INFERENCE = ("vit.commands", "vit.export", "vit.predict", "vit.quantize", "vit.runs")


def requirement_names(lines):
    """Normalised requirement strings ('torch>=2.4,<=2.14.1'), comments and blanks dropped."""
    return sorted(re.sub(r"\s+", "", line.split("#")[0]).lower() for line in lines if line.split("#")[0].strip())


def test_pyproject_and_requirements_list_the_same_packages():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = requirement_names(f)
    declared = requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    assert declared == required, f"pyproject.toml {declared} != requirements.txt {required}"
    assert project["scripts"]["vit"] == "vit.cli:main"


@pytest.mark.parametrize("launcher", [["-m", "vit"], ["main.py"]])
def test_the_command_line_lists_its_subcommands(launcher):
    r = run_subprocess([*launcher, "--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(name in r.stdout for name in COMMANDS), r.stdout


def test_import_vit_loads_no_torch():
    """The command line sets OMP_WAIT_POLICY before torch loads; `import vit` must leave that to it."""
    code = ("import sys, vit, vit.cli; assert 'torch' not in sys.modules, 'torch loaded'; "
            "from vit import ViTConfig, PRESETS, UserError; assert 'torch' not in sys.modules; "
            "from vit import ViTForImageClassification, ViTModel; print(sorted(vit.__all__))")
    r = run_subprocess(["-c", code], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ViTForImageClassification" in r.stdout


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def vit_imports(path):
    """The project modules a file imports anywhere in it (lazy imports inside functions included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vit":
            for a in node.names:  # `from vit import data` names a module, `from vit import UserError` does not
                sub = f"{node.module}.{a.name}"
                is_module = os.path.exists(os.path.join(ROOT, *sub.split("."))) or os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py")
                found.add(sub if is_module else node.module)
    return found


def part_of(module):
    """The layer a module belongs to: itself, or the subpackage it sits in."""
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), module)


def graph():
    files = [os.path.join(d, f) for d, _, names in os.walk(VIT) for f in names if f.endswith(".py")]
    return {module_name(p): vit_imports(p) - {module_name(p)} for p in files}


def test_imports_run_down_the_layers():
    wrong = []
    for module, imports in graph().items():
        if module == "vit":  # the package's face re-exports config, errors and (lazily) the model
            continue
        part = part_of(module)
        for target in imports:
            other = part_of(target)
            if other == part:
                continue
            if other not in LAYERS or part not in LAYERS or LAYERS.index(other) >= LAYERS.index(part):
                wrong.append(f"{module} imports {target} (upward or sideways)")
            elif part in ONLY and other not in ONLY[part]:
                wrong.append(f"{module} imports {target} ({part} may import only {sorted(ONLY[part]) or 'nothing'} of the project)")
    assert not wrong, "\n".join(wrong)


def test_no_import_loops():
    g = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import loop: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def reachable(start, g):
    """Every project module that importing `start` can load (its imports, theirs, ...)."""
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_inference_imports_no_training_code():
    """The commands and export reach the model, the loader and the evaluation pass, never vit/train/ (timm's inference.py)."""
    g = graph()
    for module in INFERENCE:
        training = sorted(m for m in reachable(module, g) if part_of(m) == "vit.train")
        assert not training, f"{module} reaches {training}"


def test_predict_loads_no_matplotlib(tmp_path):
    """predict prints names and scores: it loads no plotting library (matplotlib costs a second at start-up)."""
    from PIL import Image

    from vit import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         image_size=16, patch_size=8, num_labels=2)).save_pretrained(tmp_path / "model")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.png")
    code = ("import sys; from vit import cli; "
            f"code = cli.main(['predict', '--checkpoint', {str(tmp_path / 'model')!r}, {str(tmp_path / 'a.png')!r}]); "
            "print('matplotlib' in sys.modules); sys.exit(code)")
    r = run_subprocess(["-c", code], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "False", r.stdout


def test_no_module_over_450_lines():
    """Rooms stay small enough to read in one sitting; the model file included (its plumbing lives beside it)."""
    long = {}
    for d, _, names in os.walk(VIT):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(d, name)) as f:
                    lines = sum(1 for _ in f)
                if lines > 450:
                    long[os.path.relpath(os.path.join(d, name), ROOT)] = lines
    assert not long, f"over 450 lines: {long}"
