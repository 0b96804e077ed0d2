"""The grading path (hw3_*.sh and every project module they reach, package modules included) imports only what the
grader has: the packages of the course's environment, never `transformers`, the PyPI `peft`, or the scorer."""
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from import_graph import ROOT, source_dependencies, walk
from scoring_fixtures import tiny_clip_path  # noqa: F401  (a fixture)

SCRIPTS = ["hw3_1.sh", "hw3_2.sh", "hw3_download.sh"]

# The grader's packages (the course's environment), by import name, plus the dependencies they bring.
GRADER_PACKAGES = {
    "torch", "torchvision", "timm", "loralib", "numpy", "PIL", "pandas", "matplotlib", "scipy", "imageio", "cv2",
    "pycocotools", "clip", "language_evaluation", "tqdm", "gdown", "yaml", "skimage",
    # dependencies of the above
    "huggingface_hub", "safetensors", "ftfy", "regex", "requests", "packaging", "filelock", "typing_extensions",
}
FORBIDDEN = {"transformers", "peft", "pycocoevalcap", "pytest"}


def is_stdlib(name: str) -> bool:
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    stdlib = sysconfig.get_paths()["stdlib"]
    origin = spec.origin or (list(spec.submodule_search_locations or [""])[0])
    return origin.startswith(stdlib) and "site-packages" not in origin


def python_entry_points(script: Path, root: Path = ROOT):
    """Local .py files and `-c` snippets that a shell script runs with python3."""
    files, snippets = [], []
    for line in script.read_text().splitlines():
        line = line.split("#", 1)[0] if not line.lstrip().startswith("python3 -c") else line
        if "python3" not in line:
            continue
        words = shlex.split(line, posix=True)
        for i, word in enumerate(words):
            if word != "python3":
                continue
            rest = words[i + 1:]
            if rest[:1] == ["-c"] and len(rest) > 1:
                snippets.append(rest[1])
            for arg in rest:
                match = re.search(r"([\w./-]+\.py)$", arg)
                if match:
                    files.append(root / Path(match.group(1)).name)
                    break
    return files, snippets


def grading_path(root: Path = ROOT):
    """(every project file the grading scripts reach, {outside top-level package: first file importing it}),
    following package imports (tests/import_graph.py); `python3 -c` snippets count as importers too."""
    entries, outside = [], {}
    for script in SCRIPTS:
        path = root / script
        if not path.exists():
            continue
        files, snippets = python_entry_points(path, root)
        entries.extend(files)
        for snippet in snippets:
            local, needs = source_dependencies(snippet, root)
            entries.extend(local)
            for name in needs:
                outside.setdefault(name, path)
    reached, needs = walk(entries, root)
    for name, importer in needs.items():
        outside.setdefault(name, importer)
    return reached, outside


def test_grading_path_is_found():
    reached, _ = grading_path()
    names = {str(path.relative_to(ROOT)) for path in reached}
    assert {"p1_clip.py", "hw3/p1/zero_shot.py", "hw3/common/images.py"} <= names
    assert {"p2_inference.py", "hw3/p2/inference.py", "hw3/p2/checkpoint.py", "decoder.py", "tokenizer.py"} <= names
    assert {"hw3_download.py", "hw3/common/download.py", "hw3/common/manifest.py"} <= names


def test_scoring_code_stays_off_the_grading_path():
    reached, _ = grading_path()
    names = {str(path.relative_to(ROOT)) for path in reached}
    assert not names & {"p2_evaluate.py", "hw3/p2/metrics.py", "hw3/report.py", "make_report.py"}


@pytest.mark.parametrize("name, importer", sorted(grading_path()[1].items()))
def test_import_is_allowed(name, importer):
    assert name not in FORBIDDEN, f"{importer} imports {name}, which the grader does not allow"
    assert name in GRADER_PACKAGES or is_stdlib(name), \
        f"{importer} imports {name}: neither the standard library nor a grader package"


PLOTTING_AND_REPORT = ("matplotlib", "hw3.p1.analysis", "hw3.report")


def test_classifying_loads_no_plotting_and_no_report_code(tiny_clip_path, tmp_path):  # noqa: F811
    """hw3_1.sh's path as it runs: p1_clip.py classifying a folder imports neither matplotlib nor the report's
    analyses (only `p1_clip.py report` loads them); then importing the analyses does load both (the check sees them)."""
    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{index}_0.png")
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "red square", "1": "blue square"}))
    argv = [str(images), str(tmp_path / "id2label.json"), str(tmp_path / "pred.csv"), "--model", tiny_clip_path,
            "--workers", "0"]
    loaded = f"print(sorted(name for name in {PLOTTING_AND_REPORT!r} if name in sys.modules))"
    script = f"import sys\nimport p1_clip\np1_clip.main({argv!r})\n{loaded}\nimport hw3.p1.analysis\n{loaded}\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pred.csv").read_text().startswith("filename,label")
    assert result.stdout.strip().splitlines()[-2:] == ["[]", "['hw3.p1.analysis', 'matplotlib']"]


def test_the_walker_catches_forbidden_imports_inside_the_package(tmp_path):
    """A forbidden import two package levels down, inside a function, is found, and so is a `python3 -c` one."""
    (tmp_path / "hw3_2.sh").write_text('python3 "$(dirname "$0")/p2_inference.py" "$@"\n'
                                       'python3 -c "import transformers"\n')
    (tmp_path / "p2_inference.py").write_text("import json\nfrom hw3.p2 import inference\n")
    (tmp_path / "hw3" / "p2").mkdir(parents=True)
    (tmp_path / "hw3" / "__init__.py").write_text("")
    (tmp_path / "hw3" / "p2" / "__init__.py").write_text("")
    (tmp_path / "hw3" / "p2" / "peft.py").write_text("import loralib\n")  # the project's own peft module
    (tmp_path / "hw3" / "p2" / "inference.py").write_text(
        "from hw3.p2.peft import add_lora\ndef load():\n    import peft.tuners\n    from pycocoevalcap import x\n")
    reached, outside = grading_path(tmp_path)
    assert {str(path.relative_to(tmp_path)) for path in reached} == {
        "p2_inference.py", "hw3/__init__.py", "hw3/p2/__init__.py", "hw3/p2/inference.py", "hw3/p2/peft.py"}
    assert outside["peft"] == tmp_path / "hw3" / "p2" / "inference.py"  # PyPI's peft, not hw3/p2/peft.py
    assert outside["pycocoevalcap"] == tmp_path / "hw3" / "p2" / "inference.py"
    assert outside["transformers"] == tmp_path / "hw3_2.sh"
    assert outside["loralib"] == tmp_path / "hw3" / "p2" / "peft.py"
    assert {"peft", "pycocoevalcap", "transformers"} <= FORBIDDEN
    assert is_stdlib("json") and is_stdlib("os") and is_stdlib("sys") and not is_stdlib("torch")
