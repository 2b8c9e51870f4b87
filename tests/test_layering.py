"""The task boundary and the layering, kept by tests: what ``import lmtune`` loads, where task names may
appear, and the import-linter contracts of pyproject.toml (``lint-imports``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune.config.tasks import task_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmtune"
TASKS_DIR = PACKAGE / "tasks"
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")
# Packages (and lmtune's modules built on them) that one feature needs and every other run or command would
# pay for at start-up: hundreds of MB of memory and seconds (BENCHMARKS.md, "What an lmtune process loads").
# An import inside a function may load them where the feature runs, saying why.
FEATURE_PACKAGES = ("presidio_analyzer", "presidio_anonymizer", "spacy", "opacus", "gensim", "captum", "rdata",
                    "peft", "lmtune.data.pii_engine")


def _loaded_after(code: str, packages: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``packages`` are in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('LOADED:' + ','.join(m for m in {packages!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    loaded = [line for line in out.stdout.splitlines() if line.startswith("LOADED:")]
    assert len(loaded) == 1, out.stdout
    return [m for m in loaded[0].removeprefix("LOADED:").split(",") if m]


@pytest.mark.parametrize("code", [
    "import lmtune",
    "import lmtune.config; lmtune.config.load_config({'task': 'classification', 'model': 'm', 'data': {'train': 'x.csv'}})",
    # The CLI's help: the start-up a user waits for on every command.
    "import sys\nfrom lmtune.cli import main\nsys.argv = ['lmtune', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass",
], ids=["import-lmtune", "load-config", "cli-help"])
def test_start_up_imports_no_torch_or_transformers(code: str) -> None:
    assert _loaded_after(code) == []


def test_the_probe_sees_a_heavy_import() -> None:
    # The check above would pass vacuously if the probe could not see an import: it can.
    assert "torch" in _loaded_after("import torch")
    assert _loaded_after("import lmtune.training.privacy as p; p._opacus()", FEATURE_PACKAGES) == ["opacus"]


@pytest.mark.parametrize(("code", "allowed"), [
    # peft comes with transformers' schedulers (transformers.trainer_utils imports it), as in the Trainer.
    ("import lmtune.workflows.train", {"peft"}),
    ("import lmtune.workflows.run", set()),
    ("import lmtune.serve.app", set()),
], ids=["train", "predict", "serve"])
def test_a_run_loads_no_package_of_a_feature_it_does_not_use(code: str, allowed: set[str]) -> None:
    # Personal-data scanning (presidio, spaCy: ~200 MB), DP-SGD (opacus), word2vec (gensim), explanations
    # (captum), the Austen corpus (rdata) and LoRA (peft) load where they are used, not with every command.
    assert set(_loaded_after(code, FEATURE_PACKAGES)) <= allowed


def test_every_task_is_registered_on_import() -> None:
    folders = sorted(p.parent.name for p in TASKS_DIR.glob("*/__init__.py"))
    assert folders, "no task folders found"
    assert set(folders) <= set(task_names()), f"task folders not registered by `import lmtune`: " \
        f"{sorted(set(folders) - set(task_names()))}"


# ------------------------------------------------------------------------------ lazy imports
LAZY_IMPORT_FILES = ("lmtune/__init__.py", "lmtune/cli.py", "lmtune/cli_serve.py", "lmtune/console.py")  # and the task folders' __init__


def _imports_a_feature_package(line: str) -> bool:
    """``line`` imports (``import X`` / ``from X... import``) one of :data:`FEATURE_PACKAGES` or a module in it."""
    words = line.split()
    if len(words) < 2 or words[0] not in ("import", "from"):
        return False
    return any(words[1] == p or words[1].startswith(p + ".") for p in FEATURE_PACKAGES)


def lazy_import_problems(path: str, source: str) -> list[str]:
    """Each ``# noqa: PLC0415`` (an import inside a function) of ``source`` that sits outside the files
    start-up time allows it in and imports no feature's package, or says no why: on its line after the code,
    or in a comment just above."""
    allowed = path in LAZY_IMPORT_FILES or (path.startswith("lmtune/tasks/") and path.endswith("/__init__.py")
                                            and path.count("/") == 3)
    lines = source.splitlines()
    problems = []
    for i, line in enumerate(lines):
        if "noqa: PLC0415" not in line:
            continue
        if not allowed and not _imports_a_feature_package(line):
            problems.append(f"{path}:{i + 1}: an import inside a function outside {', '.join(LAZY_IMPORT_FILES)} "
                            "and lmtune/tasks/*/__init__.py, of no package in FEATURE_PACKAGES")
            continue
        said_here = line.split("noqa: PLC0415", 1)[1].strip(" ,")
        said_above = any(lines[j].strip().startswith("#") for j in range(max(0, i - 3), i))
        if not said_here and not said_above:
            problems.append(f"{path}:{i + 1}: `# noqa: PLC0415` without a comment saying why")
    return problems


def test_the_lazy_import_check_sees_misplaced_and_unexplained_ones() -> None:
    code = "def f():\n    import torch  # noqa: PLC0415\n"
    assert lazy_import_problems("lmtune/data/x.py", code)  # not a start-up file
    assert lazy_import_problems("lmtune/cli.py", code)  # no reason given
    assert not lazy_import_problems("lmtune/cli.py", code.replace("PLC0415", "PLC0415  (torch loads late)"))
    assert not lazy_import_problems("lmtune/tasks/sft/__init__.py", "def f():\n    # start-up time\n" + code[9:])
    feature = "def f():\n    from opacus.optimizers import DPOptimizer  # noqa: PLC0415\n"
    assert lazy_import_problems("lmtune/training/x.py", feature)  # a feature's package, no reason given
    assert not lazy_import_problems("lmtune/training/x.py", feature.replace("PLC0415", "PLC0415  (only for DP)"))
    assert lazy_import_problems("lmtune/training/x.py", "def f():\n    import opacusx  # noqa: PLC0415  (why)\n")


def test_lazy_imports_only_where_start_up_time_needs_them_and_say_why() -> None:
    problems = [p for path in sorted(PACKAGE.rglob("*.py"))
                for p in lazy_import_problems(path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ task names outside tasks/
def _docstring_nodes(tree: ast.Module) -> set[int]:
    """ids of the docstring constants (module, class, function): prose may name a task."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _is_task_attribute(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "task"


def _is_name_or_table(node: ast.expr) -> bool:
    """A string, a literal collection, or a module constant (``GENERATIVE_TASKS``): what a branch on a task's
    name compares with. Comparing two tasks (``run.task != cfg.task``) is no task knowledge."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
        return True
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.isupper()


def task_name_uses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each string constant equal to a task name (docstrings aside) and each comparison
    of a ``.task`` attribute, in ``source``."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and node.value in names:
            found.append((node.lineno, f"the string {node.value!r}"))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_task_attribute(s) for s in sides) and any(_is_name_or_table(s) for s in sides):
                found.append((node.lineno, "a comparison of `.task` with a name or a table of names"))
    return sorted(found)


def test_the_scanner_finds_task_names_and_task_comparisons() -> None:
    # The scan below is only as good as this: it must see each form the issue forbids, and not docstrings.
    code = '''"""classification is named here, in prose."""
TABLE = {"classification": 1}
def f(cfg):
    """sft too."""
    if cfg.task == "sft":
        return f"{cfg.task}"
    if cfg.task not in DECODERS or cfg.task != run.task:  # a table is task knowledge; two tasks compared are not
        return cfg.task in ("causal_lm",)
'''
    found = task_name_uses(code, {"classification", "sft", "causal_lm"})
    compared = "a comparison of `.task` with a name or a table of names"
    assert found == [(2, "the string 'classification'"), (5, compared), (5, "the string 'sft'"), (7, compared),
                     (8, compared), (8, "the string 'causal_lm'")]


def test_no_task_names_outside_the_task_folders() -> None:
    names = set(task_names())
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(TASKS_DIR):
            continue
        for line, what in task_name_uses(path.read_text(encoding="utf-8"), names):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "outside lmtune/tasks/, ask the task or its TaskInfo instead of naming it:\n" + \
        "\n".join(offenders)


# ------------------------------------------------------------------------------ import-linter contracts
def test_every_task_folder_is_in_the_independence_contract() -> None:
    # A new task folder left out of the contract could import another task unnoticed.
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = [set(c["modules"]) for c in contracts if c["type"] == "independence"]
    folders = {f"lmtune.tasks.{p.parent.name}" for p in TASKS_DIR.glob("*/__init__.py")}
    assert independent and any(folders <= group for group in independent), \
        f"task folders missing from the independence contract: {sorted(folders - set().union(*independent))}"


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), f"{lint_imports} is missing: pip install -e '.[dev]'"
    out = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Contracts:" in out.stdout, out.stdout + out.stderr  # it ran and checked the contracts
    assert out.returncode == 0, out.stdout[out.stdout.find("Broken contracts"):] or out.stdout + out.stderr
