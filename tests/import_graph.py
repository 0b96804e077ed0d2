"""The project's import graph, read from the source (ast): which project files a file imports, following package
imports (`hw3.p2.model` -> hw3/p2/model.py, with its packages' __init__.py), and which outside packages it needs.
Imports inside functions count too. Used by test_grading_path.py and test_layout.py."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path) -> Optional[Path]:
    """The file of project module `name` (a.b -> a/b.py or a/b/__init__.py), or None if it is not in the project."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, package: List[str]) -> List[str]:
    """Every module an import statement of `source` names: `import a.b` -> a.b; `from a import b, c` -> a, a.b,
    a.c (b and c may be submodules or plain names; the caller resolves what exists). Relative imports are resolved
    against `package` (the importing module's package, as a list of names)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package[:len(package) - node.level + 1]
                base = ".".join(prefix + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


def dependencies(path: Path, root: Path) -> Tuple[Set[Path], Dict[str, str]]:
    """(project files `path` imports directly, {outside top-level package: the import that needs it})."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return source_dependencies(path.read_text(), root, package, path)


def source_dependencies(source: str, root: Path, package: List[str] = (),
                        path: Optional[Path] = None) -> Tuple[Set[Path], Dict[str, str]]:
    """`dependencies` of source code (e.g. a `python3 -c` snippet) in `package`; `path`: its own file, if any."""
    local: Set[Path] = set()
    outside: Dict[str, str] = {}
    for name in imported_modules(source, list(package)):
        parts = name.split(".")
        found = [module_file(".".join(parts[:i]), root) for i in range(1, len(parts) + 1)]
        if found[0] is None:  # the top-level name is not the project's: an outside package
            outside.setdefault(parts[0], name)
        local.update(file for file in found if file is not None and file != path)
    return local, outside


def walk(entries: List[Path], root: Path) -> Tuple[Set[Path], Dict[str, Path]]:
    """(every project file reachable from `entries`, {outside top-level package: first file importing it})."""
    seen: Set[Path] = set()
    outside: Dict[str, Path] = {}
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        local, needs = dependencies(path, root)
        todo.extend(local)
        for name in needs:
            outside.setdefault(name, path)
    return seen, outside


def project_files(root: Path) -> List[Path]:
    """The top-level .py files and every module of the hw3 package."""
    return sorted(root.glob("*.py")) + sorted((root / "hw3").rglob("*.py"))


def import_cycles(root: Path) -> List[List[str]]:
    """Import cycles among the project's modules (each as a list of module names, the first repeated at the end)."""
    files = project_files(root)
    graph = {path: sorted(dependencies(path, root)[0]) for path in files}
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(path: Path, stack: List[Path]) -> None:
        state[path] = 1
        for dependency in graph.get(path, []):
            if state.get(dependency) == 1:
                cycle = stack[stack.index(dependency):] + [dependency]
                cycles.append([module_name(p, root) for p in cycle])
            elif dependency not in state:
                visit(dependency, stack + [dependency])
        state[path] = 2

    for path in files:
        if path not in state:
            visit(path, [path])
    return cycles
