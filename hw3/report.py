"""hw3_<studentID>.pdf from result files and the student's notes: every number on its pages is read from the
results, every sentence of analysis is the student's (their notes file, hw3/notes.py).

`build_report(p1_dir, p2_runs, p3_dir, out, ...)` is what make_report.py runs; its --help lists the input files.
The toy world, when not given, is the one P3's grounding.json names in its "world" key (no grounding: course data);
every page of a toy-world report says so at its foot. The pages name runs, files and hashes, never a folder of this
machine, and carry no date: the same results and notes give the same text.
"""
import csv
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure  # pages are drawn without pyplot: no display and no global backend needed
from matplotlib.font_manager import FontProperties
from PIL import Image

from hw3.common.encoder_names import parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.figures import show_picture
from hw3.common.files import check_writable, read_json, write_atomically, write_text_atomically
from hw3.notes import QUESTIONS, draft_text, read_notes
from hw3.p1.prompts import REQUIRED_PROMPTS, shown_template
from hw3.p2.peft import PEFT_KINDS
from hw3.toy.world import ToyWorld

REQUIRED = tuple(shown_template(prompt) for prompt in REQUIRED_PROMPTS)  # as accuracy.csv names them
SUMMARY_KEYS = ("method", "trainable_params", "checkpoint_params", "best_epoch", "best", "epochs", "decode", "data",
                "config_file", "finished_at")  # a p2_train.py run's summary.json
ATTENTION_KEYS = ("checkpoint", "checkpoint_sha256", "layer", "layer_reason", "head", "decode", "images")
GROUNDING_KEYS = ("table", "best_layer", "words_scored", "words_absent", "images", "split", "world", "world_hash",
                  "checkpoint_sha256")
SUBMISSION_KEYS = ("run", "rule", "checkpoint_sha256")  # submission.json, beside the run folders
VAL_SCORES_KEYS = ("CIDEr", "CLIPScore", "num_images")  # p2_evaluate.py --json-out
STUDENT_ID = re.compile(r"[A-Za-z0-9]+")
TOY_BANNER = "TOY WORLD: synthetic stand-in data, not the course's hw3_data; numbers not comparable with the " \
             "course baselines"
TOY_KEYWORD = "toy-world"  # a toy-world report's PDF Keywords: hw3/pipeline/submission.py refuses to submit it
PAGE = (8.27, 11.69)  # A4 portrait, inches
LEFT, WIDTH = 0.06, 0.88  # the text column, figure fractions
TOP, BOTTOM = 0.965, 0.06  # the title's top; the lowest content (the footer lies below)
LINESPACING = 1.35  # of every text block, which Flow's line heights are measured with
# A path anywhere in a text: absolute, ~/..., ./... or ../...; not the "/32" of "ViT-B/32"
PATH = re.compile(r"(?<![\w.~$/])(?:~|\.{1,2})?/[^\s,;()\[\]{}\"']+")


class ReportError(UserError):
    pass


@dataclass
class World:
    """The toy world the results come from."""
    files: ToyWorld
    manifest: dict  # toyworld.json
    boxes: Optional[dict]  # boxes.json, when there


@dataclass
class Submission:
    """The run whose checkpoint hw3_2.sh uses: the report's best setting."""
    run: str  # its folder's name under the p2 runs
    rule: str  # how it was chosen, one sentence
    checkpoint_sha256: Optional[str]
    summary: dict  # its summary.json


@dataclass
class Inputs:
    """Every input of the report, read."""
    p2_runs: Path
    p1: Dict[str, Path]  # p1_clip.py report's files by name
    p1_summary: dict
    accuracy: List[dict]  # accuracy.csv rows
    runs: Dict[str, Path]  # run folder name: run folder (cross-entropy), at least one per PEFT kind
    summaries: Dict[str, dict]  # run folder name: summary.json
    scst: Dict[str, Tuple[dict, Optional[dict]]]  # self-critical run folder name: (its summary, its --init run's)
    submission: Submission
    val_scores: dict  # p2_evaluate.py's scores of hw3_2.sh's val captions with the submitted run
    p3_images: Tuple[Path, dict]  # attention.json of the p3 images, read
    top_last: Tuple[Path, dict]  # attention.json of the top-1/last-1 val images, read
    grounding: Optional[Tuple[Path, dict]]
    world: Optional[World]
    notes: Dict[str, str] = field(default_factory=dict)  # notes heading: the student's text (hw3/notes.py)


def read_csv(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def lacking(path: Path, data: dict, keys) -> List[str]:
    absent = [key for key in keys if key not in data]
    return [f"{path} lacks {absent}"] if absent else []


def names_only(text: str) -> str:
    """`text` with every path in it cut to its last name (a sentence's final full stop stays outside the path): the
    pages name files, never a folder of this machine."""
    def last_name(match: re.Match) -> str:
        path = match.group(0)
        stop = path[len(path.rstrip(".")):]
        return (PurePosixPath(path[:len(path) - len(stop)]).name or path) + stop
    return PATH.sub(last_name, text)


def run_and_file(path: str) -> str:
    """A checkpoint path as the pages name it: its run folder's name and its file name."""
    return f"{PurePosixPath(path).name} of run {PurePosixPath(path).parent.name}"


def sentence(text: str) -> str:
    """`text` ending in a full stop (the selection rule is written as a phrase)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def short_hash(sha256: Optional[str]) -> str:
    return f"{sha256[:16]}..." if sha256 else "not recorded"


def check_student_id(student_id: str) -> None:
    """Raises ReportError unless the ID is letters and digits (it becomes part of a file name)."""
    if not STUDENT_ID.fullmatch(student_id):
        raise ReportError(f"--student-id {student_id!r}: give letters and digits only, e.g. r12345678 (the report "
                          "is named hw3_<ID>.pdf)")


def report_path(out, student_id: Optional[str]) -> Path:
    """`out`, or with a student ID the course's file name hw3_<ID>.pdf in the folder of `out`."""
    if student_id is None:
        return Path(out)
    check_student_id(student_id)
    return Path(out).parent / f"hw3_{student_id}.pdf"


# ---- inputs -----------------------------------------------------------------------------------------------------

def collect_p2_runs(p2_runs: Path, need) -> Tuple[Dict[str, Path], Dict[str, Tuple[dict, Optional[dict]]]]:
    """The cross-entropy run folders by name, and the self-critical runs' summaries with their --init run's."""
    runs: Dict[str, Path] = {}
    scst: Dict[str, Tuple[dict, Optional[dict]]] = {}
    for summary_path in sorted(p2_runs.glob("*/summary.json")) if p2_runs.is_dir() else []:
        summary = read_json(summary_path)
        if summary.get("stage", "xe") == "scst":
            init = Path(summary.get("init") or "").parent / "summary.json"
            scst[summary_path.parent.name] = (summary, read_json(init) if init.is_file() else None)
        else:
            runs[summary_path.parent.name] = summary_path.parent
            need(summary_path.parent / "curves.png", f"{summary.get('method')} training curves")
    return runs, scst


def collect_attention(p3_dir: Path, need, missing: List[str]) -> List[Tuple[Path, dict]]:
    """p3_attention.py's attention.json files under `p3_dir`, read; the p3 images' and the top-1/last-1's must be
    there (they are told apart by the "rank" of the top-1/last-1 records)."""
    attention_files = sorted(p3_dir.rglob("attention.json")) if p3_dir.is_dir() else []
    attention = [(path, read_json(path)) for path in attention_files]
    if not any(not has_ranks(info) for _, info in attention):
        missing.append(f"{p3_dir}/**/attention.json of the p3 images (p3_attention.py IMAGE_DIR ...)")
    if not any(has_ranks(info) for _, info in attention):
        missing.append(f"{p3_dir}/**/attention.json with top-1/last-1 records (p3_attention.py --top-last ...)")
    for path, info in attention:
        for record in info["images"]:
            need(path.parent / Path(record["figure"]).name, "figure named in attention.json")
    return attention


def has_ranks(info: dict) -> bool:
    return any("rank" in record for record in info["images"])


def submitted_run(p2_runs: Path, submitted: Optional[str], missing: List[str]) -> Tuple[Optional[dict], List[str]]:
    """submission.json (make_report.py --submitted RUN overrides its run) and what it lacks."""
    path = p2_runs / "submission.json"
    recorded = read_json(path) if path.is_file() else None
    if submitted is not None:
        if recorded is not None and recorded.get("run") == submitted:
            return recorded, lacking(path, recorded, SUBMISSION_KEYS)
        return {"run": submitted, "rule": "named on the command line (make_report.py --submitted)",
                "checkpoint_sha256": None}, []
    if recorded is None:
        missing.append(f"{path} (the submitted run, {{\"run\", \"rule\", \"checkpoint_sha256\"}}: the pipeline writes "
                       "it beside val_scores.json; or name the run with make_report.py --submitted RUN)")
        return None, []
    return recorded, lacking(path, recorded, SUBMISSION_KEYS)


def submission_of(recorded: dict, p2_runs: Path, summaries: Dict[str, dict],
                  scst: Dict[str, Tuple[dict, Optional[dict]]]) -> Submission:
    run = recorded["run"]
    summary = summaries.get(run) or scst.get(run, (None,))[0]
    if summary is None:
        raise ReportError(f"malformed inputs:\n  - the submitted run {run!r} has no summary.json in {p2_runs} (run "
                          f"folders there: {', '.join(sorted([*summaries, *scst])) or 'none'})")
    return Submission(run, recorded["rule"], recorded.get("checkpoint_sha256"), summary)


def collect_inputs(p1_dir: Path, p2_runs: Path, p3_dir: Path, toy_world: Optional[Path],
                   submitted: Optional[str] = None, notes: Optional[Path] = None) -> Inputs:
    """Every input file, read; raises ReportError listing all missing or malformed inputs at once."""
    missing: List[str] = []

    def need(path: Path, what: str) -> Path:
        if not path.is_file():
            missing.append(f"{path} ({what})")
        return path

    p1 = {name: need(p1_dir / name, "p1_clip.py report output") for name in
          ("summary.json", "accuracy.csv", "top5.png", "top5.json")}
    runs, scst = collect_p2_runs(p2_runs, need)
    missing += [f"{p2_runs}/*/summary.json with method {method!r} (p2_train.py run folder)" for method in PEFT_KINDS
                if not any(read_json(run / "summary.json").get("method") == method for run in runs.values())]
    recorded, malformed = submitted_run(p2_runs, submitted, missing)
    scores_path = need(p2_runs / "val_scores.json", "p2_evaluate.py --json-out of hw3_2.sh's val captions with the "
                                                    "submitted run")
    attention = collect_attention(p3_dir, need, missing)
    if notes is not None:
        need(notes, "the student's notes, --notes")
    if missing:
        raise ReportError("missing inputs:\n  - " + "\n  - ".join(missing))

    summaries = {name: read_json(run / "summary.json") for name, run in runs.items()}
    val_scores = read_json(scores_path)
    grounding_files = sorted(p3_dir.rglob("grounding.json"))
    grounding = (grounding_files[0], read_json(grounding_files[0])) if grounding_files else None
    malformed += [line for name, run in runs.items()
                  for line in lacking(run / "summary.json", summaries[name], SUMMARY_KEYS)]
    malformed += lacking(scores_path, val_scores, VAL_SCORES_KEYS)
    malformed += [line for path, info in attention for line in lacking(path, info, ATTENTION_KEYS)]
    malformed += lacking(*grounding, GROUNDING_KEYS) if grounding else []
    if malformed:
        raise ReportError("malformed inputs:\n  - " + "\n  - ".join(malformed))
    return Inputs(p2_runs, p1, read_json(p1["summary.json"]), read_csv(p1["accuracy.csv"]), runs, summaries, scst,
                  submission_of(recorded, p2_runs, summaries, scst), val_scores,
                  next((path, info) for path, info in attention if not has_ranks(info)),
                  next((path, info) for path, info in attention if has_ranks(info)), grounding,
                  read_world(toy_world, grounding), read_notes(notes) if notes is not None else {})


def read_world(toy_world: Optional[Path], grounding: Optional[Tuple[Path, dict]]) -> Optional[World]:
    if toy_world is None and grounding is not None:  # only a toy world has boxes to ground words in
        toy_world = Path(grounding[1]["world"])
    if toy_world is None:
        return None
    files = ToyWorld(toy_world)
    if not files.manifest_path.is_file():
        raise ReportError(f"missing inputs:\n  - {files.manifest_path} (the toy world the results name)")
    return World(files, read_json(files.manifest_path), read_json(files.boxes) if files.boxes.is_file() else None)


# ---- drawing helpers --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Font:
    size: float = 9.5
    weight: str = "normal"
    style: str = "normal"

    def text_style(self) -> dict:
        return {"fontsize": self.size, "weight": self.weight, "style": self.style}


BODY, SMALL, HEADING = Font(), Font(8.5), Font(11, "bold")


@functools.lru_cache(maxsize=None)
def measuring_renderer():
    """One Agg renderer measures the text of every page: in points, a text's size does not depend on its figure."""
    return FigureCanvasAgg(Figure(figsize=PAGE)).get_renderer()


def text_width(text: str, font: Font) -> float:
    """The width of one line of `text`, as a fraction of the page's width."""
    renderer = measuring_renderer()
    properties = FontProperties(size=font.size, weight=font.weight, style=font.style)
    width, _, _ = renderer.get_text_width_height_descent(text, properties, ismath=False)
    return width / renderer.dpi / PAGE[0]


@functools.lru_cache(maxsize=None)
def line_heights(font: Font) -> Tuple[float, float]:
    """(the height of one line, what each further line adds) of text drawn at `font`, as page-height fractions;
    measured on glyphs that reach high and low, so no line is taller."""
    figure = Figure(figsize=PAGE)
    renderer = FigureCanvasAgg(figure).get_renderer()
    one, two = (figure.text(0, 0.5, "\n".join(["Ag|()[]{}"] * lines), linespacing=LINESPACING, **font.text_style())
                .get_window_extent(renderer).height / renderer.dpi / PAGE[1] for lines in (1, 2))
    return one, two - one


def wrap(text: str, font: Font, width: float = WIDTH) -> List[str]:
    """`text` in lines no wider than `width` (page fraction): its own line breaks kept, lines broken at spaces, a
    word wider than a line broken inside."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = word
            while len(line) > 1 and text_width(line, font) > width:
                cut = len(line) - 1
                while cut > 1 and text_width(line[:cut], font) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def fitted(text: str, font: Font, width: float = WIDTH) -> Font:
    """`font`, smaller where `text` would be wider than `width` on one line (down to 6 pt)."""
    while font.size > 6 and text_width(text, font) > width:
        font = Font(font.size - 0.5, font.weight, font.style)
    return font


def new_page(title: Optional[str] = None, size: float = 15) -> Tuple[Figure, float]:
    """A page with `title` at its top, wrapped to the text column; returns it and the height below the title."""
    figure = Figure(figsize=PAGE)
    if not title:
        return figure, TOP
    font = Font(size, "bold")
    lines = wrap(title, font)
    figure.text(LEFT, TOP, "\n".join(lines), va="top", linespacing=LINESPACING, parse_math=False, **font.text_style())
    first, further = line_heights(font)
    return figure, TOP - first - (len(lines) - 1) * further - 0.018


def draw_table(figure: Figure, y: float, height: float, header: List[str], rows: List[List[str]],
               widths: Optional[List[float]] = None, bold_row: Optional[int] = None) -> None:
    axis = figure.add_axes([LEFT, y - height, WIDTH, height])
    axis.axis("off")
    cells = axis.table(cellText=[[names_only(cell) for cell in row] for row in rows], colLabels=header,
                       loc="upper center", cellLoc="center", colWidths=widths, bbox=[0, 0, 1, 1])
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    for (row, _), cell in cells.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold", fontsize=7)  # long labels stay inside their column
        elif bold_row is not None and row == bold_row + 1:
            cell.set_text_props(weight="bold")


class Flow:
    """The pages of one part of the report, filled from the top down: what does not fit on a page goes on to a new
    page under the same title, marked "(continued)"."""

    def __init__(self, title: Optional[str], title_size: float = 15):
        self.title, self.title_size = title, title_size
        self.pages: List[Figure] = []
        self.y = 0.0  # where the next item's top goes, page-height fraction

    def new_page(self) -> Figure:
        title = f"{self.title} (continued)" if self.pages and self.title else self.title
        figure, self.y = new_page(title, self.title_size)
        self.pages.append(figure)
        return figure

    def room(self, height: float) -> Figure:
        """The page that has `height` free below self.y: the current one, or a new one."""
        return self.pages[-1] if self.pages and self.y - height >= BOTTOM else self.new_page()

    def text(self, text: str, font: Font = BODY, gap: float = 0.012, **style) -> None:
        """Wrapped text (paths cut to their names); its lines run on to new pages as needed."""
        lines = wrap(names_only(text), font)
        first, further = line_heights(font)
        while lines:
            page = self.room(first)
            fit = 1 + max(0, int((self.y - BOTTOM - first) / further))
            chunk, lines = lines[:fit], lines[fit:]
            page.text(LEFT, self.y, "\n".join(chunk), va="top", linespacing=LINESPACING, parse_math=False,
                      **font.text_style(), **style)
            self.y -= first + (len(chunk) - 1) * further
            if lines:
                self.new_page()
        self.y -= gap

    def line(self, text: str, font: Font, gap: float = 0.008, **style) -> None:
        """One line, in a smaller font where it would not fit the text column."""
        self.text(text, fitted(names_only(text), font), gap, **style)

    def table(self, header: List[str], rows: List[List[str]], widths: Optional[List[float]] = None,
              bold_row: Optional[int] = None, height_per_row: float = 0.022) -> None:
        height = height_per_row * (len(rows) + 1)
        draw_table(self.room(height), self.y, height, header, rows, widths, bold_row)
        self.y -= height + 0.02

    def picture(self, path: Path, height: float, width: float = 0.9, least: float = 0.7) -> None:
        """The PNG at `path` centred below, at most `width` wide and `height` tall (page fractions), aspect kept;
        shrunk to the room left on the page, down to `least` of its size (else it goes on a new page)."""
        pixels = np.asarray(Image.open(path).convert("RGB"))
        aspect = pixels.shape[0] / pixels.shape[1] * PAGE[0] / PAGE[1]  # page-height fraction per width fraction
        height = min(height, width * aspect)
        page = self.room(least * height)
        height = min(height, self.y - BOTTOM)
        width = height / aspect
        show_picture(page.add_axes([0.5 - width / 2, self.y - height, width, height]), pixels)
        self.y -= height + 0.02

    def captioned_picture(self, caption: str, font: Font, path: Path, height: float, width: float = 0.9,
                          least: float = 0.7) -> None:
        """`caption` above the picture (Flow.picture), on the same page."""
        with Image.open(path) as image:
            natural = min(height, width * image.height / image.width * PAGE[0] / PAGE[1])
        first, further = line_heights(font)
        self.room(first + (len(wrap(names_only(caption), font)) - 1) * further + 0.004 + least * natural)
        self.text(caption, font, gap=0.004)
        self.picture(path, height, width, least)


def add_footers(pages: List[Figure], toy: bool) -> None:
    """Page numbers; on a toy-world report, TOY_BANNER at the foot of every page."""
    for number, page in enumerate(pages, 1):
        page.text(LEFT + WIDTH, 0.02, f"{number} / {len(pages)}", fontsize=8, color="grey", ha="right", va="bottom")
        if toy:
            page.text(LEFT, 0.02, TOY_BANNER, color="#b30000", va="bottom", parse_math=False,
                      **fitted(TOY_BANNER, Font(8, "bold"), WIDTH - 0.08).text_style())


def answer(flow: Flow, inputs: Inputs, heading: str) -> None:
    """The student's text for `heading` of the notes; where there is none, the question marked as still to be
    answered: loudly on course data, quietly on the toy world (no student answers toy questions)."""
    text = inputs.notes.get(heading)
    if text:
        flow.text(text)
    elif inputs.world is None:
        flow.text(f"TO BE WRITTEN BY THE STUDENT: {QUESTIONS[heading]}", Font(10, "bold"), color="red")
    else:
        flow.text(f"(The student's answer goes here: {QUESTIONS[heading]})", Font(9, style="italic"), color="grey")


# ---- pages ------------------------------------------------------------------------------------------------------

def cover_pages(inputs: Inputs) -> List[Figure]:
    flow = Flow("DLCV Fall 2023 - Homework 3 report", title_size=18)
    world, summaries, submission = inputs.world, inputs.summaries, inputs.submission
    if world:
        manifest = world.manifest
        data = (f"TOY WORLD (toyworld.py, an offline synthetic stand-in for hw3_data; not the course data): generator "
                f"{manifest.get('generator_version')}, hash {manifest.get('hash')}, settings "
                f"{json.dumps(manifest.get('settings'))}. Its tiny CLIP reaches "
                f"{manifest['clip']['history'][-1]['p1_val_acc']:.3f} zero-shot accuracy on its p1 val set; its "
                f"tiny GPT-2 has val perplexity {manifest['lm']['val_perplexity']:.2f}. Numbers below are toy-world "
                "numbers and are not comparable with the course baselines.")
    else:
        data = "Course data (hw3_data): " + "; ".join(sorted({str(s.get("data")) for s in summaries.values()}))
    p1, (_, p3), v = inputs.p1_summary, inputs.p3_images, inputs.val_scores
    paragraphs = [
        "Built by make_report.py from result files only; the written answers are the student's (make_report.py "
        "--notes).", "Data: " + data,
        f"P1: CLIP model(s) {', '.join(names_only(str(m)) for m in p1['main_setting']['models'])}; "
        f"{p1['readable_images']} labelled images; device {p1['device']}.",
        "P2: runs " + "; ".join(f"{name} (config {PurePosixPath(str(s['config_file'])).name})"
                                for name, s in summaries.items()) +
        f". Submitted run (hw3_2.sh's checkpoint): {submission.run} (checkpoint sha256 "
        f"{short_hash(submission.checkpoint_sha256)}). How it was chosen: {sentence(submission.rule)}",
        "P2 scores of the submitted captions (p2_evaluate.py): " + ", ".join(
            [f"{v['num_images']} images"] + [f"{label} {v[key]}" for key, label in (
                ("annotation_file", "annotations"), ("clip_model", "CLIPScore with"), ("tokenizer", "tokenizer"))
                                             if key in v]) + ".",
        f"P3: {run_and_file(p3['checkpoint'])} (sha256 {short_hash(p3['checkpoint_sha256'])}, "
        f"{same_checkpoint(p3['checkpoint_sha256'], submission)}), layer {p3['layer']} ({p3['layer_reason']}), "
        f"{'heads averaged' if p3['head'] is None else 'head %d' % p3['head']}, beam size "
        f"{p3['decode']['beam_size']}.",
    ]
    if inputs.grounding:
        _, g = inputs.grounding
        paragraphs.append(f"Grounding: {g['images']} {g['split']} images of the toy world (hash {g['world_hash']}; "
                          f"checkpoint sha256 {short_hash(g['checkpoint_sha256'])}).")
    for paragraph in paragraphs:
        flow.text(paragraph, Font(10))
    return flow.pages


def same_checkpoint(sha256: str, submission: Submission) -> str:
    if submission.checkpoint_sha256 is None:
        return "the submitted checkpoint's hash is not recorded"
    return "the submitted checkpoint" if sha256 == submission.checkpoint_sha256 else "NOT the submitted checkpoint"


def prompt_rows(accuracy: List[dict]) -> List[List[str]]:
    """accuracy.csv as table rows, one per setting with its accuracy without and with flip; the required prompts
    first."""
    merged: Dict[tuple, Dict[str, str]] = {}
    for row in accuracy:
        key = (row["prompt"], row["templates"], row["synonyms"], row["model"])
        merged.setdefault(key, {})[row["flip"]] = row["accuracy"]
    order = sorted(merged, key=lambda k: (REQUIRED.index(k[0]) if k[0] in REQUIRED else len(REQUIRED)))
    return [[prompt, templates, synonyms, model, merged[key].get("no", "-"), merged[key].get("yes", "-")]
            for key in order for prompt, templates, synonyms, model in [key]]


def p1_pages(inputs: Inputs) -> List[Figure]:
    flow = Flow("Problem 1: zero-shot classification with CLIP")
    flow.text("1. Why CLIP classifies zero-shot", HEADING)
    answer(flow, inputs, "P1 Q1")
    flow.y -= 0.01
    flow.text("2. Prompts (accuracy %, without / with horizontal-flip test-time augmentation)", HEADING)
    flow.table(["prompt", "templates", "synonyms", "model", "accuracy", "with flip"], prompt_rows(inputs.accuracy),
               widths=[0.38, 0.1, 0.1, 0.22, 0.1, 0.1])
    main = inputs.p1_summary["main_setting"]
    flow.text(f"The submitted setting is {main['prompt']!r} ({len(main['templates'])} templates, synonyms "
              f"{main['synonyms']}, flip {main['flip']}): {main['accuracy']:.2f}%.")
    answer(flow, inputs, "P1 Q2")
    top5 = Flow("Problem 1: top-5 probabilities of three sampled val images")
    samples = read_json(inputs.p1["top5.json"])
    top5.text("Images drawn at random (seed in summary.json): " + "; ".join(
        f"{s['file']} (true: {s['true']}, top-1: {s['top'][0]['label']} {s['top'][0]['probability']:.3f})"
        for s in samples))
    top5.picture(inputs.p1["top5.png"], 0.7)
    return flow.pages + top5.pages


def scst_table(flow: Flow, runs: Dict[str, Tuple[dict, Optional[dict]]], submitted: str) -> None:
    """Cross-entropy vs the self-critical stage started from it: the val scores of the best epoch of each."""
    def scores(summary: Optional[dict]) -> List[str]:
        if summary is None:
            return ["-", "-", "-"]
        best = summary["best"]
        return [f"{best['CIDEr']:.4f}", f"{best['CLIPScore']:.4f}", f"beam {summary['decode']['beam_size']}"]
    rows = [[name, *scores(xe), *scores(summary)] for name, (summary, xe) in runs.items()]
    flow.text("Self-critical stage (p2_train.py --init): the cross-entropy run it started from, then the stage's "
              "best epoch (validation decoding as shown).")
    flow.table(["SCST run", "XE CIDEr", "XE CLIPScore", "XE val", "SCST CIDEr", "SCST CLIPScore", "SCST val"], rows,
               bold_row=list(runs).index(submitted) if submitted in runs else None)


def encoder_name(summary: dict) -> str:
    """The run's frozen encoder, short enough for a table column: a CLIP name, a timm architecture up to its patch
    size with its weights' tag (timm:vit_so400m_patch14_siglip_384.webli -> vit_so400m.webli), or a file's name."""
    encoder = parse_encoder_name(summary.get("encoder") or "-")
    if encoder.kind == "timm":
        return encoder.model.split("_patch")[0] + (f".{encoder.tag}" if encoder.tag else "")
    if encoder.file.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return Path(encoder.file).name
    return encoder.text


def best_run_per_method(summaries: Dict[str, dict]) -> Dict[str, str]:
    """PEFT kind: the name of its run with the best val CIDEr."""
    best: Dict[str, str] = {}
    for name, summary in summaries.items():
        method = summary["method"]
        if method not in best or summary["best"]["CIDEr"] > summaries[best[method]]["best"]["CIDEr"]:
            best[method] = name
    return {method: best[method] for method in PEFT_KINDS}


def best_setting_line(submission: Submission, val_scores: dict) -> str:
    """The P2 page's first line: the submitted run and the val scores of hw3_2.sh's captions with it."""
    return (f"Best setting: {submission.run} ({submission.summary['method']}, {encoder_name(submission.summary)}): "
            f"val CIDEr {val_scores['CIDEr']:.3f}, CLIPScore {val_scores['CLIPScore']:.3f}")


def best_setting(flow: Flow, inputs: Inputs) -> None:
    submission, v = inputs.submission, inputs.val_scores
    flow.line(best_setting_line(submission, v), Font(11, "bold"))
    stage = ""
    if submission.summary.get("stage") == "scst":
        stage = (f" The run is a self-critical stage (SCST) started from run "
                 f"{PurePosixPath(str(submission.summary.get('init'))).parent.name}.")
    flow.text(f"These are the scores p2_evaluate.py (the course's CIDEr-D and CLIPScore) gives the captions hw3_2.sh "
              f"writes for the {v['num_images']} val images with this run's checkpoint (sha256 "
              f"{short_hash(submission.checkpoint_sha256)}): the result the TA reproduces.{stage} How the run was "
              f"chosen: {sentence(submission.rule)}")


def p2_pages(inputs: Inputs) -> List[Figure]:
    flow = Flow("Problem 2: PEFT captioning")
    best_setting(flow, inputs)
    summaries, submitted = inputs.summaries, inputs.submission.run
    flow.y -= 0.01
    flow.text("Three PEFT attempts", HEADING)
    flow.text("Validation scores of the best epoch of each run during training (val CIDEr picks the epoch; decoding "
              "as listed): one run per PEFT method, and any encoder candidates, with the frozen encoder each reads. "
              "Trainable parameters are counted on the saved checkpoint, which holds only them (the limit is < 35M), "
              "and while training (prefix tuning may train an MLP that the checkpoint stores collapsed).")
    rows = [[name, s["method"], encoder_name(s), f"{s['checkpoint_params']:,}", f"{s['trainable_params']:,}",
             str(s["best_epoch"]), f"{s['best']['CIDEr']:.4f}", f"{s['best']['CLIPScore']:.4f}",
             f"beam {s['decode']['beam_size']}"] for name, s in summaries.items()]
    flow.table(["run", "method", "encoder", "saved", "trained", "epoch", "CIDEr", "CLIPScore", "decoding"], rows,
               bold_row=list(summaries).index(submitted) if submitted in summaries else None)
    flow.text("Config files: " + "; ".join(f"{name}: {PurePosixPath(str(s['config_file'])).name}"
                                           for name, s in summaries.items()) + ".", SMALL)
    if inputs.scst:
        scst_table(flow, inputs.scst, submitted)
    for name, summary in summaries.items():
        flow.text(f"{name}: " + ", ".join(
            f"epoch {e['epoch']}: loss {e['train_loss']:.3f}, CIDEr {e['CIDEr']:.3f}, CLIPScore {e['CLIPScore']:.3f}"
            for e in summary["epochs"]), SMALL, gap=0.006)
    flow.y -= 0.01
    flow.text("Discussion", HEADING)
    answer(flow, inputs, "P2")
    return flow.pages + curves_pages(inputs)


def curves_pages(inputs: Inputs) -> List[Figure]:
    """The training curves of the best run of each method, and of the submitted run where it is another."""
    flow = Flow("Problem 2: training curves (loss; val CIDEr and CLIPScore), the best run of each method")
    shown = {f"{method} ({name})": inputs.runs[name] for method, name in
             best_run_per_method(inputs.summaries).items()}
    submitted = inputs.p2_runs / inputs.submission.run
    if submitted not in shown.values() and (submitted / "curves.png").is_file():
        shown[f"submitted run ({submitted.name})"] = submitted
    for label, folder in shown.items():
        flow.captioned_picture(label, HEADING, folder / "curves.png", 0.23)
    return flow.pages


def named_pairs(caption: str, boxes: dict) -> List[str]:
    pattern = r"\b(%s) (%s)\b" % ("|".join(boxes["colours"]), "|".join(boxes["shapes"]))
    return [" ".join(m) for m in re.findall(pattern, caption.lower())]


def pair_counts(records: List[dict], world: Optional[World], split: str) -> Optional[tuple]:
    """(pairs named, of them present, objects shown, of them named) over toy-world records; None without boxes."""
    if not world or not world.boxes:
        return None
    named = present = shown = mentioned = 0
    for record in records:
        objects = world.boxes["splits"].get(split, {}).get(Path(record["file"]).name)
        if objects is None:
            return None
        truth = {f"{o['colour']} {o['shape']}" for o in objects["objects"]}
        pairs = named_pairs(record["caption"], world.boxes)
        named, present = named + len(pairs), present + sum(p in truth for p in pairs)
        shown, mentioned = shown + len(truth), mentioned + len(truth & set(pairs))
    return named, present, shown, mentioned


def caption_check(record: dict, world: Optional[World], split: str) -> str:
    """For toy-world images: which named colour-shape pairs are really in the image."""
    if not world or not world.boxes:
        return ""
    objects = world.boxes["splits"].get(split, {}).get(Path(record["file"]).name)
    if objects is None:
        return ""
    present = sorted(f"{o['colour']} {o['shape']}" for o in objects["objects"])
    named = named_pairs(record["caption"], world.boxes)
    right = [p for p in named if p in present]
    wrong = sorted(set(named) - set(present))
    return (f" Objects in the image: {', '.join(present)}; the caption names {len(named)} pair(s), "
            f"{len(right)} of them present{' (wrong: ' + ', '.join(wrong) + ')' if wrong else ''}"
            f"{'' if set(present) <= set(named) else '; missed: ' + ', '.join(p for p in present if p not in named)}.")


def record_label(record: dict) -> str:
    if "rank" in record:
        return f"{record['rank']} by CLIPScore: {record['name']} (CLIPScore {record['clip_score']:.4f}, " \
               f"CIDEr {record['cider']:.4f})"
    return record["name"]


def figure_pages(title: str, path: Path, info: dict, world: Optional[World], split: str) -> List[Figure]:
    """The figures at full page width, as many per page as fit; a figure may shrink to 70% to share a page, and one
    taller than a page is scaled down to fit."""
    flow = Flow(title)
    for record in info["images"]:
        flow.captioned_picture(f"{record_label(record)}: \"{record['caption']}\"." +
                               caption_check(record, world, split), Font(9),
                               path.parent / Path(record["figure"]).name, height=1, width=0.92)
        flow.y -= 0.01
    return flow.pages


def p3_analysis_pages(inputs: Inputs) -> List[Figure]:
    flow = Flow("Problem 3: how the maps are made; analysis")
    _, p3 = inputs.p3_images
    _, top_last = inputs.top_last
    cls = np.mean([r["cls_share"] for r in p3["images"]])
    flow.text(f"How the maps are made: each caption comes from beam search (beam {p3['decode']['beam_size']}); one "
              f"teacher-forced pass of the final caption then records the cross-attention of decoder layer "
              f"{p3['layer']} ({p3['layer_reason']}). Attention is causal, so each word's map is exactly the "
              "attention of the step that chose it. The CLS token is dropped (on the p3 images it received "
              f"{100 * cls:.1f}% of the attention on average), the patch weights are renormalised, mapped back onto "
              "the part of the photo CLIP's resize and centre crop kept, upsampled and scaled to each panel's own "
              "maximum. Words made of several BPE tokens show the mean of their tokens' maps.")
    counts = pair_counts(p3["images"], inputs.world, "p3")
    if counts:
        named, present, shown, mentioned = counts
        flow.text(f"Captions against the toy world's boxes: on the {len(p3['images'])} p3 images the captions name "
                  f"{named} colour-shape pairs, {present} of them really in the image; they mention {mentioned} of "
                  f"the {shown} objects shown (the figure pages list each image's objects).")
    ranks = {r["rank"]: r for r in top_last["images"]}
    flow.text(f"Top-1 val image by CLIPScore: {ranks['top1']['name']} ({ranks['top1']['clip_score']:.4f}) "
              f"\"{ranks['top1']['caption']}\"; last-1: {ranks['last1']['name']} "
              f"({ranks['last1']['clip_score']:.4f}) \"{ranks['last1']['caption']}\".")
    if inputs.grounding is None:
        flow.text("Grounding: not measured (it needs the toy world's object boxes).")
    else:
        grounding_table(flow, inputs.grounding[1], p3["layer"])
    flow.y -= 0.01
    flow.text("3. Is the caption reasonable? Does the attended region reflect the corresponding word?", HEADING)
    answer(flow, inputs, "P3 Q3")
    return flow.pages


def grounding_table(flow: Flow, g: dict, figure_layer: int) -> None:
    flow.y -= 0.01
    flow.text("Grounding score per decoder layer", HEADING)
    flow.text(f"For every generated word naming a colour or shape of an object in the image ({g['words_scored']} "
              f"words on {g['images']} {g['split']} images; {g['words_absent']} more named something absent and "
              "are not scored): the share of the word's attention that falls inside that object's box, against "
              "the share uniform attention would give (baseline).")
    rows = [[str(r["layer"]), str(r["words"]), f"{r['mean_share']:.3f}", f"{r['mean_baseline']:.3f}",
             f"{r['ratio']:.2f}x", f"{r['colour_share']:.3f}", f"{r['shape_share']:.3f}",
             f"{r['best_head']} ({r['best_head_share']:.3f})"] for r in g["table"]]
    best_index = [r["layer"] for r in g["table"]].index(g["best_layer"])
    flow.table(["layer", "words", "share in box", "baseline", "ratio", "colour words", "shape words",
                "best head (share)"], rows, bold_row=best_index)
    best = g["table"][best_index]
    verdict = "meets" if best["ratio"] >= 2 else "does NOT meet"
    flow.text(f"Layer {g['best_layer']} grounds best: {100 * best['mean_share']:.1f}% of a named object's word "
              f"attention lies in its box, {best['ratio']:.2f}x the uniform baseline of "
              f"{100 * best['mean_baseline']:.1f}%; it {verdict} the 2x target. The figures use layer "
              f"{figure_layer}.")


# ---- the notes' draft: the facts each answer should cite -----------------------------------------------------

def p1_facts(inputs: Inputs) -> Dict[str, List[str]]:
    main = inputs.p1_summary["main_setting"]
    submitted = (f"submitted setting: {main['prompt']!r} ({len(main['templates'])} templates, synonyms "
                 f"{main['synonyms']}, flip {main['flip']}): {main['accuracy']:.2f}%")
    models = ", ".join(names_only(str(model)) for model in main["models"])
    prompts = [f"{prompt!r} ({model}): {no}% without flip, {yes}% with flip"
               for prompt, _, _, model, no, yes in prompt_rows(inputs.accuracy) if prompt in REQUIRED]
    return {"P1 Q1": [f"CLIP model(s): {models}; {inputs.p1_summary['readable_images']} labelled val images; "
                      f"{submitted}"],
            "P1 Q2": prompts + [submitted]}


def p2_facts(inputs: Inputs) -> List[str]:
    facts = [best_setting_line(inputs.submission, inputs.val_scores) + " (p2_evaluate.py on hw3_2.sh's captions)",
             f"how it was chosen: {sentence(inputs.submission.rule)}"]
    facts += [f"{name} ({s['method']}, {encoder_name(s)}): best epoch {s['best_epoch']}, val CIDEr "
              f"{s['best']['CIDEr']:.4f}, CLIPScore {s['best']['CLIPScore']:.4f} (beam {s['decode']['beam_size']}); "
              f"{s['checkpoint_params']:,} parameters in the checkpoint, {s['trainable_params']:,} trained"
              for name, s in inputs.summaries.items()]
    facts += [f"{name} (self-critical stage from run {PurePosixPath(str(s.get('init'))).parent.name}): best epoch "
              f"{s['best_epoch']}, val CIDEr {s['best']['CIDEr']:.4f}, CLIPScore {s['best']['CLIPScore']:.4f} (beam "
              f"{s['decode']['beam_size']})" for name, (s, _) in inputs.scst.items()]
    return facts


def word_peaks(record: dict) -> str:
    """"; attention peaks: WORD: top left, 12% of the attention | ..." from an attention.json record (its words alone
    when it holds no peaks)."""
    if record.get("peaks"):
        return "; attention peaks: " + " | ".join(f"{word}: {place}" for word, place in record["peaks"]) + "."
    return f"; one map per word: {' | '.join(record['words'])}" if record.get("words") else ""


def p3_facts(inputs: Inputs) -> List[str]:
    _, p3 = inputs.p3_images
    ranks = {r["rank"]: r for r in inputs.top_last[1]["images"]}
    facts = [f"{label} val image by CLIPScore: {r['name']}, CLIPScore {r['clip_score']:.4f}, CIDEr {r['cider']:.4f}: "
             f"\"{r['caption']}\"" for label, r in (("top-1", ranks["top1"]), ("last-1", ranks["last1"]))]
    facts += [f"{r['name']}: \"{r['caption']}\"" + word_peaks(r) + caption_check(r, inputs.world, "p3")
              for r in p3["images"]]
    facts.append(f"maps of decoder layer {p3['layer']} ({names_only(str(p3['layer_reason']))}); where each word's "
                 "attention peaks is the patch with the most of it, in thirds of the encoder's view")
    if inputs.grounding:
        g = inputs.grounding[1]
        best = next(r for r in g["table"] if r["layer"] == g["best_layer"])
        facts.append(f"grounding (toy world boxes): layer {g['best_layer']} puts {100 * best['mean_share']:.1f}% of "
                     f"a named object's word attention in its box, {best['ratio']:.2f}x uniform")
    return facts


def draft_facts(inputs: Inputs) -> Dict[str, List[str]]:
    return {**p1_facts(inputs), "P2": p2_facts(inputs), "P3 Q3": p3_facts(inputs)}


# ---- building -----------------------------------------------------------------------------------------------------

def report_pages(inputs: Inputs) -> List[Figure]:
    p3_path, p3 = inputs.p3_images
    tl_path, tl = inputs.top_last
    pages = cover_pages(inputs) + p1_pages(inputs) + p2_pages(inputs)
    pages += figure_pages("Problem 3: attention maps of the p3 images", p3_path, p3, inputs.world, "p3")
    pages += figure_pages("Problem 3: top-1 and last-1 val images by CLIPScore", tl_path, tl, inputs.world,
                          "p2_val")
    pages += p3_analysis_pages(inputs)
    add_footers(pages, inputs.world is not None)
    return pages


@dataclass
class Built:
    path: Path  # the PDF written
    pages: int
    unwritten: List[str]  # the notes headings the student has not answered


def build_report(p1_dir, p2_runs, p3_dir, out, toy_world=None, submitted: Optional[str] = None, notes=None,
                 student_id: Optional[str] = None) -> Built:
    """Writes the report (whole, or not at all) to `out`, or with `student_id` to hw3_<ID>.pdf beside it; raises
    ReportError listing the missing or malformed inputs."""
    path = report_path(out, student_id)
    check_writable(path)
    inputs = collect_inputs(Path(p1_dir), Path(p2_runs), Path(p3_dir), Path(toy_world) if toy_world else None,
                            submitted, Path(notes) if notes else None)
    pages = report_pages(inputs)

    metadata = {"Title": "DLCV HW3 report", "Creator": "make_report.py", "CreationDate": None}  # no date
    if inputs.world is not None:
        metadata["Keywords"] = TOY_KEYWORD

    def write_pdf(temporary: str) -> None:
        with PdfPages(temporary, metadata=metadata) as pdf:
            for page in pages:
                pdf.savefig(page)
    write_atomically(path, write_pdf)
    return Built(path, len(pages), [heading for heading in QUESTIONS if heading not in inputs.notes])


def draft_notes(p1_dir, p2_runs, p3_dir, path, toy_world=None, submitted: Optional[str] = None) -> Path:
    """Writes a notes file at `path` (never over an existing file): every heading with the facts its answer should
    cite and a TODO line (hw3.notes.draft_text)."""
    path = Path(path)
    if path.exists():
        raise ReportError(f"{path} exists: a draft never replaces notes (give another path, or move that file away)")
    check_writable(path)
    inputs = collect_inputs(Path(p1_dir), Path(p2_runs), Path(p3_dir), Path(toy_world) if toy_world else None,
                            submitted)
    write_text_atomically(path, draft_text(draft_facts(inputs)))
    return path
