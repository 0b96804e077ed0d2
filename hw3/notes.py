"""The student's written answers for the report: a notes file with one section per prose question.

    ## P1 Q1
    > a fact from the results, for reference (never printed)
    The answer, in paragraphs separated by blank lines; lines of a paragraph are joined.
    - a line starting with "- ", "* " or "1. " starts a line of its own

Headings are exactly the keys of QUESTIONS (`## P1 Q1`, `## P1 Q2`, `## P2`, `## P3 Q3`), each at most once, in any
order; text before the first heading is ignored. Lines starting with ">" (facts) or "TODO" (placeholders) are never
the student's text, so a section holding only them is unwritten. The report builder (hw3/report.py) places each
section on its question's page; `draft_text` writes the file `make_report.py --draft-notes` starts from.
"""
import re
from pathlib import Path
from typing import Dict, List

from hw3.common.errors import UserError

QUESTIONS = {  # heading: the course's question, as the report names it where the answer is missing
    "P1 Q1": "Why can CLIP achieve competitive zero-shot performance on a great variety of image classification "
             "datasets, when previous methods (VGG, ResNet) need significant effort to adapt to a new task?",
    "P1 Q2": "Compare and discuss the performances of the three prompt templates.",
    "P2": "Discuss your best setting and your three PEFT attempts (adapter, prefix tuning, LoRA).",
    "P3 Q3": "Analyze the predicted captions and the attention maps: is the caption reasonable? Does the attended "
             "region reflect the corresponding word in the caption?",
}
HEADING = re.compile(r"^##(?!#)\s*(.*?)\s*$")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s")


class NotesError(UserError):
    pass


def read_notes(path) -> Dict[str, str]:
    """{heading: the student's text} for every section of the notes file at `path` with text of its own
    (paragraphs separated by one blank line); raises NotesError for an unknown or repeated heading."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise NotesError(f"notes file {path} is not UTF-8 text: save it as UTF-8") from None
    sections: Dict[str, List[str]] = {}
    current = None
    for number, line in enumerate(lines, 1):
        heading = HEADING.match(line)
        if heading:
            current = heading.group(1)
            if current not in QUESTIONS:
                raise NotesError(f"notes file {path}, line {number}: unknown heading {line.strip()!r}; the headings "
                                 f"are {', '.join('## ' + name for name in QUESTIONS)}")
            if current in sections:
                raise NotesError(f"notes file {path}, line {number}: {line.strip()!r} appears twice")
            sections[current] = []
        elif current is not None and not line.lstrip().startswith((">", "TODO")):
            sections[current].append(line.rstrip())
    texts = {name: paragraphs(body) for name, body in sections.items()}
    return {name: text for name, text in texts.items() if text}


def paragraphs(lines: List[str]) -> str:
    """Markdown-style text: a blank line ends a paragraph, list items start a line, other lines join the one above."""
    blocks: List[List[str]] = [[]]
    for line in lines:
        if not line.strip():
            blocks.append([])
        elif LIST_ITEM.match(line) or not blocks[-1]:
            blocks[-1].append(line.strip())
        else:
            blocks[-1][-1] += " " + line.strip()
    return "\n\n".join("\n".join(block) for block in blocks if block)


def draft_text(facts: Dict[str, List[str]]) -> str:
    """A notes file with every heading of QUESTIONS: the question and `facts[heading]` as "> " lines, then a TODO
    line for the answer."""
    parts = ["Your written answers for make_report.py --notes THIS_FILE.",
             "Replace each TODO line with your answer (blank lines separate paragraphs). Lines starting with \">\" "
             "are facts from your results, for reference: they and TODO lines never reach the PDF.", ""]
    for heading, question in QUESTIONS.items():
        parts += [f"## {heading}", f"> Question: {question}"]
        parts += [f"> {fact}" for fact in facts.get(heading, [])]
        parts += ["TODO: your answer", ""]
    return "\n".join(parts)
