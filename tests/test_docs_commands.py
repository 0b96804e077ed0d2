"""Every command line README.md and docs/*.md show runs as written: each `python3 X.py ...`, `torchrun ... X.py ...` and
`bash X.sh ...` (in code blocks and in inline code) names a script of the repository and passes only options that
script accepts, and every option it requires.

A script's options are read from its own `--help` (argparse's option list, and its usage line for the required ones),
all in one child process. A `.sh` script is checked against the CLI it hands "$@" to (demo.sh -> demo.py, hw3_1.sh ->
p1_clip.py, ...), read from the script itself; test.sh hands its arguments to pytest (not checked) and a script that
never uses "$@" (setup.sh) takes none. `python3 X.py WORD ...` is a subcommand when `X.py WORD --help` prints a usage
of its own (p1_clip.py report, p3_attention.py grounding)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")"}
WORD = re.compile(r"[a-z]+")  # what a subcommand looks like

# Runs `SCRIPT [WORD] --help` for each request with runpy, in one process (torch and the rest imported once).
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
root, requests = sys.argv[1], json.loads(sys.argv[2])
os.chdir(root)
found = {}
for script, word in requests:
    path = os.path.join(root, script)
    buffer, code = io.StringIO(), 0
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path] + ([word] if word else []) + ["--help"]
    sys.path[:0] = [os.path.dirname(path), root]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # a script that cannot even print its help
        code = 1
        buffer.write(f"{type(error).__name__}: {error}")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    found[json.dumps([script, word])] = [code, buffer.getvalue()]
print("HELP-JSON" + json.dumps(found))
"""


class Command(NamedTuple):
    where: str  # document:line
    script: str  # as written, relative to the repository root
    args: Tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {' '.join((self.script,) + self.args)}"


class Options(NamedTuple):
    accepted: Set[str]
    required: Set[str]


# ---- finding the commands ----------------------------------------------------------------------------------------

def shell_words(text: str) -> List[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


def commands_in_words(words: List[str], where: str) -> List[Command]:
    """The python3 / torchrun / bash commands among shell words; each runs to the next operator."""
    found = []
    for index, word in enumerate(words):
        start = None
        if word == "python3" and index + 1 < len(words) and words[index + 1].endswith(".py"):
            start = index + 1
        elif word == "bash" and index + 1 < len(words) and words[index + 1].endswith(".sh"):
            start = index + 1
        elif word == "torchrun":
            start = next((i for i in range(index + 1, len(words)) if words[i].endswith(".py")), None)
        if start is None:
            continue
        end = next((i for i in range(start + 1, len(words)) if words[i] in OPERATORS), len(words))
        found.append(Command(where, words[start], tuple(words[start + 1:end])))
    return found


def commands_in(text: str, name: str) -> List[Command]:
    """Commands in fenced code blocks (backslash continuations joined), then in inline code (which may wrap)."""
    found: List[Command] = []
    prose: List[str] = []
    in_block, block_start, pending = False, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            block_start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found += commands_in_words(shell_words(pending + line), f"{name}:{block_start}")
        pending = ""
    prose_text = "\n".join(prose)
    for match in re.finditer(r"`([^`]+)`", prose_text):
        line = prose_text.count("\n", 0, match.start()) + 1
        found += commands_in_words(shell_words(match.group(1).replace("\n", " ")), f"{name}:{line}")
    return found


def documented_commands() -> List[Command]:
    return [command for document in DOCUMENTS
            for command in commands_in(document.read_text(), str(document.relative_to(ROOT)))]


# ---- what each script accepts ------------------------------------------------------------------------------------

def shell_target(script: Path) -> Optional[str]:
    """What a .sh script hands its arguments to: a Python script's path, 'pytest', or None (it takes none)."""
    text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    if '"$@"' not in text:
        return None
    if "-m pytest" in text:
        return "pytest"
    match = re.search(r'([\w-]+\.py)"?\s+"\$@"', text)
    assert match, f"{script.name} passes \"$@\" on, but to no Python script this test can find"
    return str((script.parent / match.group(1)).relative_to(ROOT))


def run_helps(requests: Set[Tuple[str, Optional[str]]]) -> Dict[Tuple[str, Optional[str]], Tuple[int, str]]:
    ordered = sorted(requests, key=lambda request: (request[0], request[1] or ""))
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(ROOT), json.dumps(ordered)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "HELP-JSON" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    found = json.loads(result.stdout.split("HELP-JSON", 1)[1])
    return {tuple(json.loads(key)): tuple(value) for key, value in found.items()}


def parse_help(text: str) -> Options:
    """Options from argparse's help: the option list's lines, and the usage line's options outside brackets."""
    accepted = set()
    for line in text.splitlines():
        match = re.match(r"\s+(-.*?)(?:\s{2,}|$)", line)
        if match:
            accepted.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", match.group(1)))
    usage = text.split("usage:", 1)[1].split("\n\n", 1)[0] if "usage:" in text else ""
    previous = None
    while previous != usage:  # innermost [...] and (...) groups first: optional or alternatives
        previous, usage = usage, re.sub(r"\[[^\[\]]*\]|\([^()]*\)", " ", usage)
    return Options(accepted, set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage)))


def target_of(command: Command) -> Tuple[Optional[str], List[str]]:
    """(the script whose options apply, or None for pytest / no script; problems found on the way)."""
    path = ROOT / command.script
    if not path.is_file():
        return None, [f"{command}: no script {command.script} in the repository"]
    if command.script.endswith(".sh"):
        target = shell_target(path)
        if target is None:
            return None, [f"{command}: {command.script} takes no arguments"] if command.args else []
        return (None, []) if target == "pytest" else (target, [])
    return command.script, []


def subcommand_word(command: Command) -> Optional[str]:
    first = command.args[0] if command.args else ""
    return first if WORD.fullmatch(first) else None


def help_requests(commands: List[Command]) -> Set[Tuple[str, Optional[str]]]:
    requests = set()
    for command in commands:
        target, _ = target_of(command)
        if target:
            requests.add((target, None))
            if subcommand_word(command):
                requests.add((target, subcommand_word(command)))
    return requests


def command_problems(command: Command, helps: Dict[Tuple[str, Optional[str]], Tuple[int, str]]) -> List[str]:
    target, problems = target_of(command)
    if target is None:
        return problems
    args = list(command.args)
    word = subcommand_word(command)
    key = (target, None)
    if word:
        code, text = helps[(target, word)]
        if code == 0 and re.search(rf"usage: \S+ {word}\b", text):
            key, args = (target, word), args[1:]
    code, text = helps[key]
    if code != 0:
        return [f"{command}: `{' '.join(filter(None, key))} --help` fails (exit status {code}): {text[-300:]}"]
    options = parse_help(text)
    given = set()
    for arg in args:
        arg = arg.strip("[]").rstrip(".")
        if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", arg):
            given.add(arg.split("=", 1)[0])
    if {"-h", "--help"} & given:
        return []
    problems += [f"{command}: {' '.join(filter(None, key))} has no option {flag}"
                 for flag in sorted(given - options.accepted)]
    problems += [f"{command}: {' '.join(filter(None, key))} requires {flag}"
                 for flag in sorted(options.required - given)]
    return problems


# ---- the tests ---------------------------------------------------------------------------------------------------

BROKEN = """
```bash
python3 p2_train.py --config configs/adapter.yaml --no-such-flag 3
bash no_such_script.sh hw3_data
python3 p3_attention.py IMAGES --checkpoint best.pt
```
Inline: `bash setup.sh --fast`, `python3 nowhere/else.py --x` and `bash hw3_2.sh IMAGES OUT.json DECODER
--beamsize 5`.
"""
FINE = """
```bash
python3 p3_attention.py IMAGES --checkpoint C --decoder D      # a comment --not-an-option
bash test.sh -m "not slow" --anything
bash demo.sh --check [--data hw3_data] && python3 p1_clip.py report DIR ID2LABEL --out-dir results/p1
python3 p3_attention.py grounding DIR --checkpoint C --split p2_val
python3 p2_train.py --out runs/adapter --resume --set lr=3e-4 model.adapter_size=64
torchrun --nproc_per_node 4 p2_train.py --config configs/adapter.yaml --out runs/adapter
```
"""


@pytest.fixture(scope="module")
def helps():
    commands = documented_commands() + commands_in(BROKEN, "BROKEN") + commands_in(FINE, "FINE")
    return run_helps(help_requests(commands))


def test_every_documented_command_names_a_script_and_its_options(helps):
    commands = documented_commands()
    scripts = {command.script for command in commands}
    assert len(commands) > 30 and {"hw3_1.sh", "hw3_2.sh", "hw3_download.sh", "demo.sh", "p2_train.py"} <= scripts, \
        "the commands were not found: has the documents' format changed?"
    problems = [problem for command in commands for problem in command_problems(command, helps)]
    assert not problems, "documented commands that do not run as written:\n" + "\n".join(problems)


def test_the_check_catches_a_made_up_option_script_or_missing_required_option(helps):
    problems = [problem for command in commands_in(BROKEN, "BROKEN") for problem in command_problems(command, helps)]
    assert problems == [
        "BROKEN:3: p2_train.py --config configs/adapter.yaml --no-such-flag 3: p2_train.py has no option --no-such-flag",
        "BROKEN:4: no_such_script.sh hw3_data: no script no_such_script.sh in the repository",
        "BROKEN:5: p3_attention.py IMAGES --checkpoint best.pt: p3_attention.py requires --decoder",
        "BROKEN:7: setup.sh --fast: setup.sh takes no arguments",
        "BROKEN:7: nowhere/else.py --x: no script nowhere/else.py in the repository",
        "BROKEN:7: hw3_2.sh IMAGES OUT.json DECODER --beamsize 5: p2_inference.py has no option --beamsize",
    ]


def test_correct_commands_pass_the_check(helps):
    commands = commands_in(FINE, "FINE")
    assert [command.script for command in commands] == ["p3_attention.py", "test.sh", "demo.sh", "p1_clip.py",
                                                        "p3_attention.py", "p2_train.py", "p2_train.py"]
    assert commands[0].args == ("IMAGES", "--checkpoint", "C", "--decoder", "D")  # the comment is not an argument
    assert [problem for command in commands for problem in command_problems(command, helps)] == []


def test_shell_scripts_hand_their_arguments_to_the_right_cli():
    assert {name: shell_target(ROOT / name) for name in
            ("demo.sh", "test.sh", "setup.sh", "hw3_1.sh", "hw3_2.sh", "hw3_download.sh")} == {
        "demo.sh": "demo.py", "test.sh": "pytest", "setup.sh": None, "hw3_1.sh": "p1_clip.py",
        "hw3_2.sh": "p2_inference.py", "hw3_download.sh": "hw3_download.py"}
