"""The import rules of the layout: course files and thin CLIs at the root over one library package, hw3/.

- hw3/ never imports a top-level script; of the root modules it may import only the course's decoder.py and
  tokenizer.py, which themselves import nothing of the project (they are leaves).
- hw3/p1 and hw3/p2 never import each other; hw3/common imports no problem's subpackage (it is what they share).
- The core (hw3/common, hw3/p1, hw3/p2, hw3/p3) never imports the layers above it: the toy world (hw3/toy), the
  pipeline (hw3/pipeline) and the report (hw3/report.py). The CLIs and the pipeline hand the core what those hold.
- No import circles anywhere (imports inside functions count: a lazy import does not hide a circle).
Each rule is a function returning its violations, checked on the repository and on a tree that breaks it.
"""
from pathlib import Path
from typing import Dict, List, Tuple

from import_graph import ROOT, dependencies, import_cycles, module_name

COURSE_LEAVES = ("decoder.py", "tokenizer.py")  # the course's modules the library builds on
PROBLEM_PACKAGES = ("hw3.p1", "hw3.p2", "hw3.p3", "hw3.toy", "hw3.report", "hw3.notes", "hw3.pipeline")
CORE = ("hw3.common", "hw3.p1", "hw3.p2", "hw3.p3")
ABOVE_CORE = ("hw3.toy", "hw3.pipeline", "hw3.report", "hw3.notes")


def library_files(root: Path) -> List[Path]:
    return sorted((root / "hw3").rglob("*.py"))


def script_imports(root: Path) -> List[str]:
    """Library modules importing a top-level module other than the course leaves, and leaves importing the
    project."""
    violations = []
    for path in library_files(root):
        for dependency in dependencies(path, root)[0]:
            if dependency.parent == root and dependency.name not in COURSE_LEAVES:
                violations.append(f"{module_name(path, root)} imports the script {dependency.name}")
    for name in COURSE_LEAVES:
        if (root / name).is_file():
            violations += [f"{name} imports {module_name(d, root)}" for d in dependencies(root / name, root)[0]]
    return violations


def within(module: str, packages) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def forbidden_imports(root: Path, forbidden: Dict[str, Tuple[str, ...]]) -> List[str]:
    """"importer imports imported" for each module of a package in `forbidden` that imports one it bans."""
    violations = []
    for path in library_files(root):
        importer = module_name(path, root)
        for package, banned in forbidden.items():
            if within(importer, [package]):
                for dependency in dependencies(path, root)[0]:
                    imported = module_name(dependency, root)
                    if within(imported, banned):
                        violations.append(f"{importer} imports {imported}")
    return violations


def cross_imports(root: Path) -> List[str]:
    """hw3.p1 <-> hw3.p2 imports, and hw3.common importing a problem's subpackage."""
    return forbidden_imports(root, {"hw3.p1": ("hw3.p2",), "hw3.p2": ("hw3.p1",), "hw3.common": PROBLEM_PACKAGES})


def core_imports_above(root: Path) -> List[str]:
    """A core module (CORE) importing the toy world, the pipeline or the report (ABOVE_CORE)."""
    return sorted(set(forbidden_imports(root, {package: ABOVE_CORE for package in CORE})))


def test_the_library_never_imports_a_script():
    assert script_imports(ROOT) == []


def test_p1_and_p2_stay_apart_and_common_depends_on_no_problem():
    assert cross_imports(ROOT) == []


def test_the_core_never_imports_the_toy_world_the_pipeline_or_the_report():
    assert core_imports_above(ROOT) == []


def test_no_import_circles():
    assert import_cycles(ROOT) == []


def test_the_rules_catch_what_they_forbid(tmp_path):
    files = {
        "p1_clip.py": "from hw3.p1 import zero_shot\n",
        "decoder.py": "import torch\n",
        "tokenizer.py": "import decoder\n",  # a leaf that is not one
        "hw3/__init__.py": "", "hw3/p1/__init__.py": "", "hw3/p2/__init__.py": "", "hw3/common/__init__.py": "",
        "hw3/p1/zero_shot.py": "import decoder\ndef report():\n    import p1_clip\n    from hw3.p2.model import M\n",
        "hw3/p2/model.py": "from hw3.p1 import zero_shot\n",
        "hw3/common/images.py": "from hw3.p2 import model\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert script_imports(tmp_path) == ["hw3.p1.zero_shot imports the script p1_clip.py",
                                        "tokenizer.py imports decoder"]
    assert set(cross_imports(tmp_path)) == {"hw3.common.images imports hw3.p2",
                                            "hw3.common.images imports hw3.p2.model",
                                            "hw3.p1.zero_shot imports hw3.p2", "hw3.p1.zero_shot imports hw3.p2.model",
                                            "hw3.p2.model imports hw3.p1", "hw3.p2.model imports hw3.p1.zero_shot"}
    cycles = import_cycles(tmp_path)
    assert ["p1_clip", "hw3.p1.zero_shot", "p1_clip"] in cycles  # the lazy import inside report() counts
    assert any({"hw3.p1.zero_shot", "hw3.p2.model"} <= set(cycle) for cycle in cycles)


def test_the_core_rule_catches_what_it_forbids(tmp_path):
    files = {
        "hw3/__init__.py": "", "hw3/common/__init__.py": "", "hw3/p2/__init__.py": "", "hw3/p3/__init__.py": "",
        "hw3/toy/__init__.py": "", "hw3/pipeline/__init__.py": "",
        "hw3/toy/world.py": "from hw3.p2 import config\n",  # above the core: it may import the core
        "hw3/pipeline/inputs.py": "from hw3.toy.world import ToyWorld\nfrom hw3.p3 import commands\n",
        "hw3/report.py": "from hw3.toy import world\nfrom hw3.pipeline import inputs\n",
        "hw3/p3/commands.py": "from hw3.toy.world import ToyWorld\n",
        "hw3/p2/config.py": "def defaults():\n    import hw3.pipeline.inputs\n",  # a lazy import counts
        "hw3/common/files.py": "from hw3 import report\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert core_imports_above(tmp_path) == [
        "hw3.common.files imports hw3.report", "hw3.p2.config imports hw3.pipeline",
        "hw3.p2.config imports hw3.pipeline.inputs", "hw3.p3.commands imports hw3.toy",
        "hw3.p3.commands imports hw3.toy.world"]
