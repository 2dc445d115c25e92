"""The package's house rules, read from its source (docs/design.md, "Engine and front ends"):
no module uses another gradcomp module's underscore names, imports form no circle and the
engine imports no front end, and no function outside the benchmarks is over 60 lines.
Each checker is also run on a small made-up package that breaks its rule, so that it is
seen to catch what it looks for. The private-name check cannot see a reach to a name the
reaching module also defines itself, nor one through ``getattr``."""

from __future__ import annotations

import ast
import pathlib

import gradcomp

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "python" / "gradcomp"
PACKAGE = SOURCE if SOURCE.is_dir() else pathlib.Path(gradcomp.__file__).parent  # the source tree, or the wheel's
MAX_FUNCTION_LINES = 60
COMPILED = ("_C",)  # the package's compiled modules: no source to parse, but importing one loads the core
FRONT_ENDS = ("state", "hooks", "per_parameter", "allreduce", "fsdp", "diloco", "integrations")


def modules_of(root: pathlib.Path) -> dict[str, ast.Module]:
    """Dotted module name -> its syntax tree, for every .py file under ``root`` (a package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([root.name, *parts])] = ast.parse(path.read_text(), str(path))
    return out


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_defined(tree: ast.Module) -> set[str]:
    """The underscore names a module defines: its classes' methods and attributes, and its own
    top-level functions, classes and variables."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(inner.name)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.attr)
                elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.id)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if private(n)}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_reaches(modules: dict[str, ast.Module], packages: set[str]) -> list[str]:
    """Where a module imports another module's underscore name, or uses an underscore attribute
    that only other modules of the package define (on ``self`` too: a method inherited from a
    class of another module). Compiled modules (``_C``) and torch's own names are not ours."""
    root = next(iter(modules)).split(".")[0]
    defined = {name: private_names_defined(tree) for name, tree in modules.items()}
    found = []
    for name, tree in modules.items():
        own = defined[name]
        others = set().union(*(names for other, names in defined.items() if other != name)) - own
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = resolve(name, name in packages, node)
                if source.split(".")[0] == root:
                    found += [f"{name}:{node.lineno} imports {a.name} from {source}" for a in node.names
                              if private(a.name) and f"{source}.{a.name}" not in modules and a.name != "_C"]
            elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr in others:
                found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    return found


def import_edges(modules: dict[str, ast.Module], packages: set[str]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports when it is imported (top-level statements),
    compiled ones (``COMPILED``) included. A module's own ancestor packages are left out:
    Python imports them before the module whatever it says (``from . import _C`` names the
    package only to reach the compiled module)."""
    root = next(iter(modules)).split(".")[0]
    known = set(modules) | {f"{root}.{c}" for c in COMPILED}
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, tree in modules.items():
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = resolve(name, name in packages, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            edges[name].update(t for t in targets if t in known and t != name and not name.startswith(t + "."))
    return edges


def imports_anywhere(modules: dict[str, ast.Module], packages: set[str], name: str) -> set[str]:
    """Every module of the package that ``name`` imports anywhere (inside functions and
    ``try`` blocks too), its own ancestor packages included: what it may reach at run time."""
    out = set()
    for node in ast.walk(modules[name]):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, name in packages, node)
            out.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names)
    return out & set(modules)


def upward_imports(modules: dict[str, ast.Module], packages: set[str], lower: str, upper: tuple) -> list[str]:
    """Where a module under ``lower`` imports, anywhere, the package itself (its __init__,
    which imports everything) or a module named in ``upper``."""
    root = next(iter(modules)).split(".")[0]
    return [f"{m} imports {t}" for m in modules if m == f"{root}.{lower}" or m.startswith(f"{root}.{lower}.")
            for t in sorted(imports_anywhere(modules, packages, m))
            if t == root or (t.count(".") >= 1 and t.split(".")[1] in upper)]


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module importing ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports found by a depth-first walk (each reported once per entry point)."""
    circles, state = [], {}  # state: 1 on the path, 2 done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    return circles


def long_functions(modules: dict[str, ast.Module], limit: int) -> list[str]:
    return [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)" for name, tree in modules.items()
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def packages_of(root: pathlib.Path) -> set[str]:
    return {".".join([root.name, *p.parent.relative_to(root).parts]) for p in root.rglob("__init__.py")}


# ---------------------------------------------------------------------------- the package


def test_no_module_uses_another_modules_underscore_names():
    found = private_reaches(modules_of(PACKAGE), packages_of(PACKAGE))
    assert not found, "private names reached across modules:\n" + "\n".join(found)


def test_imports_form_no_circle_and_the_engine_imports_no_front_end():
    modules, packages = modules_of(PACKAGE), packages_of(PACKAGE)
    edges = import_edges(modules, packages)
    assert not import_circles(edges)
    assert any(m.startswith("gradcomp.engine.") for m in modules), "the engine's modules were not found"
    assert not upward_imports(modules, packages, "engine", FRONT_ENDS)
    assert "gradcomp._C" in reachable(edges, "gradcomp.ops")  # the check below can see the core
    assert "gradcomp._C" not in reachable(edges, "gradcomp.codecs")  # the spec grammar loads no kernels


def test_no_function_outside_the_benchmarks_is_over_60_lines():
    modules = {m: t for m, t in modules_of(PACKAGE).items() if not m.startswith("gradcomp.benchmarks")}
    assert len(modules) > 10
    assert not long_functions(modules, MAX_FUNCTION_LINES)


# ---------------------------------------------------------------------------- the checkers


def write_package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checkers_catch_what_they_look_for(tmp_path):
    root = write_package(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from .b import _helper, public\nfrom . import _C\n"
                "class A:\n    def __init__(self):\n        self._mine = 1\n"
                "    def go(self, b):\n        return b._count + self._mine + self._inherited()\n",
        "b.py": "from . import a\n_helper = 1\npublic = 2\n"
                "class B:\n    def __init__(self):\n        self._count = 0\n    def _inherited(self):\n"
                "        return 1\n",
        "sub/__init__.py": "from ..a import A\n",
        "sub/long.py": "def f():\n" + "    x = 1\n" * 70,
        "sub/late.py": "def g():\n    from ..a import A\n    import pkg\n    return A, pkg\n",
    })
    modules, packages = modules_of(root), packages_of(root)
    found = private_reaches(modules, packages)
    assert any("imports _helper" in f for f in found)
    assert any("b._count" in f for f in found) and any("self._inherited" in f for f in found)
    assert not any("_mine" in f or "public" in f for f in found)
    edges = import_edges(modules, packages)
    assert ["pkg.a", "pkg.b", "pkg.a"] in import_circles(edges)
    assert reachable(edges, "pkg.b") == {"pkg.a", "pkg.b", "pkg._C"} and reachable(edges, "pkg._C") == set()
    assert long_functions(modules, MAX_FUNCTION_LINES) == ["pkg.sub.long.f (71 lines)"]
    assert upward_imports(modules, packages, "sub", ("a",)) == ["pkg.sub imports pkg.a", "pkg.sub.late imports pkg",
                                                                 "pkg.sub.late imports pkg.a"]
    assert upward_imports(modules, packages, "sub", ("b",)) == ["pkg.sub.late imports pkg"]  # the package itself
    clean = write_package(tmp_path / "clean", {"__init__.py": "from .a import f\n", "a.py": "def f():\n    pass\n"})
    assert not private_reaches(modules_of(clean), packages_of(clean))
    assert not import_circles(import_edges(modules_of(clean), packages_of(clean)))
