"""make_report.py (hw3/report.py, hw3/notes.py): a report built from small fabricated (but well-formed) result files
has the expected pages, the numbers of those files and the student's notes where the questions are; missing or
malformed inputs give one clear error listing them. No test here needs the toy world: the inputs are fabricated."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import List

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

import make_report
from hw3 import notes as notes_module
from hw3 import report
from hw3.common.errors import EXIT_USER_ERROR, run_cli
from hw3.common.files import shown_path, shown_text
from hw3.pipeline.submission import TOY_REPORT_MARK

ROOT = Path(__file__).resolve().parents[1]

P3_NAMES = ["bike", "girl", "sheep", "ski", "umbrella"]


def png(path: Path, size=(300, 200), colour=(200, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fabricate(root: Path) -> dict:
    """Result files shaped like p1_clip.py report, p2_train.py, p3_attention.py and toyworld.py write them."""
    world = fabricate_world(root / "world")
    fabricate_p1(root / "p1")
    fabricate_p2(root / "p2")
    fabricate_p3(root / "p3", world)
    return {"p1": root / "p1", "p2": root / "p2", "p3": root / "p3", "world": world}


def fabricate_world(world: Path) -> Path:
    write_json(world / "toyworld.json", {"generator_version": "toyworld-fabricated", "hash": "feedc0ffee123456",
                                         "settings": {"seed": 0, "small": False},
                                         "clip": {"history": [{"p1_val_acc": 0.8896}]},
                                         "lm": {"val_perplexity": 3.21}})
    write_json(world / "boxes.json", {"colours": ["red", "cyan", "orange"], "shapes": ["star", "triangle"], "splits": {
        "p3": {f"{n}.jpg": {"objects": [{"colour": "orange", "shape": "star", "box": [0, 0, 9, 9]}]}
               for n in P3_NAMES},
        "p2_val": {"111.jpg": {"objects": []}, "222.jpg": {"objects": []}}}})
    return world


def fabricate_p1(p1: Path) -> None:
    write_json(p1 / "summary.json", {"main_setting": {"prompt": "cifar18", "templates": ["a photo of a {}."] * 18,
                                                      "synonyms": False, "models": ["clip.pt"], "flip": True,
                                                      "accuracy": 81.4},
                                     "readable_images": 2500, "device": "cpu"})
    with open(p1 / "accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "templates", "synonyms", "model", "flip", "accuracy", "correct", "images",
                         "image_seconds", "text_seconds"])
        for prompt, accuracy in [("a photo of a {object}.", 77.25), ("No {object}, no score.", 45.5),
                                 ("This is a photo of {object}", 67.5), ("This is not a photo of {object}", 69.52)]:
            for flip in ("no", "yes"):
                writer.writerow([prompt, 1, "no", "clip.pt", flip, f"{accuracy + (flip == 'yes'):.2f}", 1, 2, 1, 1])
    png(p1 / "top5.png", (900, 600))
    write_json(p1 / "top5.json", [{"file": f"{i}_400.png", "true": "red star",
                                   "top": [{"label": "red star", "probability": 0.9}]} for i in range(3)])


def fabricate_p2(p2: Path) -> None:
    for index, method in enumerate(["adapter", "prefix", "lora"]):
        run = p2 / f"toy_{method}"
        write_json(run / "summary.json", {
            "config_file": f"configs/toy_{method}.yaml", "method": method, "trainable_params": 20000 + index,
            "checkpoint_params": 12345 + index, "best_epoch": 2, "best": {"CIDEr": 0.9 + index / 100,
                                                                          "CLIPScore": 0.7 + index / 1000},
            "epochs": [{"epoch": 1, "train_loss": 1.5, "CIDEr": 0.5, "CLIPScore": 0.6, "seconds": 10}],
            "decode": {"beam_size": 3}, "data": "toy world (fabricated)", "encoder": "/w/clip.pt",
            "finished_at": "2026-11-23T10:00:00"})
        png(run / "curves.png", (1100, 400))
    write_json(p2 / "val_scores.json", {"CIDEr": 0.9345, "CLIPScore": 0.7123, "num_images": 500,
                                        "annotation_file": str(p2.parent / "data" / "val.json"),
                                        "clip_model": str(p2.parent / "world" / "clip.pt"), "tokenizer": "ptb",
                                        "pred_file": str(p2 / "val_predictions.json")})
    # not the run with the best val CIDEr during training (toy_lora): the report must name this one
    write_json(p2 / "submission.json", {"run": "toy_adapter", "rule": "The pipeline's choice (fabricated).",
                                        "checkpoint_sha256": "ab" * 32})


def fabricate_p3(p3: Path, world: Path) -> None:
    common = {"checkpoint": "runs/toy_lora/best.safetensors", "checkpoint_sha256": "ab" * 32, "layer": 1,
              "layer_reason": "best grounding layer measured", "head": None, "decode": {"beam_size": 3},
              "created_at": "2026-11-23T11:00:00"}
    records = []
    for name in P3_NAMES:
        png(p3 / "images" / f"{name}.png", (1400, 1100))
        records.append({"name": name, "file": f"/data/{name}.jpg", "figure": f"elsewhere/{name}.png",
                        "caption": "An orange star and a red triangle.", "cls_share": 0.2,
                        "words": ["An", "orange", "star", "and", "a", "red", "triangle", "."],
                        "peaks": [[word, "top left, 12% of the attention"] for word in ["An", "orange"]]})
    write_json(p3 / "images" / "attention.json", {**common, "images": records})
    ranks = []
    for rank, stem, score in [("top1", "111", 0.8765), ("last1", "222", 0.4321)]:
        png(p3 / "top_last" / f"{rank}_{stem}.png", (1400, 600))
        ranks.append({"name": stem, "file": f"/v/{stem}.jpg", "figure": f"{rank}_{stem}.png", "caption": "A star.",
                      "cls_share": 0.1, "rank": rank, "clip_score": score, "cider": 0.5, "scored_caption": "A star."})
    write_json(p3 / "top_last" / "attention.json", {**common, "images": ranks})
    table = [{"layer": layer, "words": 40, "mean_share": share, "mean_baseline": 0.12, "ratio": share / 0.12,
              "colour_share": share, "shape_share": share, "best_head": 0, "best_head_share": share + 0.01}
             for layer, share in [(0, 0.2), (1, 0.3)]]
    write_json(p3 / "grounding" / "grounding.json", {
        "table": table, "best_layer": 1, "words_scored": 40, "words_absent": 3, "images": 500, "split": "p2_val",
        "world": str(world), "world_hash": "feedc0ffee123456", "checkpoint_sha256": "ab" * 32,
        "created_at": "2026-11-23T11:30:00"})


def pdf_streams_text(path: Path) -> str:
    """The PDF's decompressed content streams: text appears there in kerned pieces, but runs of digits are whole."""
    streams = re.findall(rb"stream\r?\n(.*?)\r?\nendstream", path.read_bytes(), re.S)
    return "".join(zlib.decompressobj().decompress(s).decode("latin-1", "replace") for s in streams
                   if s[:1] == b"x")  # zlib header


def page_count(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))


def arguments(folders: dict, out: Path) -> list:
    return ["--p1-dir", str(folders["p1"]), "--p2-runs", str(folders["p2"]), "--p3-dir", str(folders["p3"]),
            "--out", str(out)]


def build(folders: dict, out: Path, capsys) -> str:
    make_report.main(arguments(folders, out))
    return capsys.readouterr().out


def build_error(folders: dict, out: Path, capsys) -> str:
    """What the command line prints when the build fails: one line (and a list) on stderr, exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: make_report.main(arguments(folders, out)), "make_report.py")
    assert exit_.value.code == EXIT_USER_ERROR
    return capsys.readouterr().err


def set_summaries(folders: dict, **values) -> None:
    for summary_path in folders["p2"].glob("*/summary.json"):
        summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), **values}))


def pdf_pages(path: Path) -> List[str]:
    """The text of each page (pdftotext), whitespace runs as one space; skips the test without pdftotext."""
    if not shutil.which("pdftotext"):
        pytest.skip("needs pdftotext (poppler-utils) to read the text")
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    return [" ".join(page.split()) for page in text.split("\f") if page.strip()]


def pdf_text(path: Path) -> str:
    return " ".join(pdf_pages(path))


BEST_SETTING = re.compile(r"Best setting: (\S+) \((\S+), (\S+)\): val CIDEr (\d\.\d{3}), CLIPScore (\d\.\d{3})")


def test_report_pages_and_numbers_come_from_the_result_files(tmp_path, capsys):
    folders = fabricate(tmp_path)
    out = tmp_path / "report" / "hw3_report.pdf"
    printed = build(folders, out, capsys)
    # cover, P1 text + top-5, P2 table + curves, 5 tall p3 figures one a page, 2 wide top/last on one, analysis
    pages = 1 + 2 + 2 + 5 + 1 + 1
    assert page_count(out) == pages and f"wrote {out} ({pages} pages)" in printed
    streams = pdf_streams_text(out)
    # 0.890: the tiny CLIP's accuracy, from the toyworld.json of the world grounding.json names
    for expected in ["0.934", "0.8765", "0.4321", "12,346", "feedc0ffee123456", "2.50x", "0.890"]:
        assert expected in streams, expected
    if shutil.which("pdftotext"):  # the whole text (poppler-utils is not part of the environment)
        text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True, text=True).stdout
        flat = " ".join(text.split())
        for expected in ["TOY WORLD", "feedc0ffee123456", "0.890", "This is not a photo of {object}", "69.52",
                         "70.52", "81.40%", "12,346", "0.9200", "0.7020",
                         "Best setting: toy_adapter (adapter, clip.pt): val CIDEr 0.934, CLIPScore 0.712",
                         "top1 by CLIPScore: 111 (CLIPScore 0.8765", "last1", "0.4321",
                         "2.50x", "meets the 2x target", "Objects in the image: orange star",
                         "1 of them present", "Layer 1 grounds best: 30.0%"]:
            assert expected in flat, expected
        prompts = flat[flat.index("2. Prompts"):]
        assert prompts.index("This is a photo of {object}") < prompts.index("a photo of a {object}.")  # required first
        for canned in ["400 million", "largely ignores", "than the plain one"]:  # no prose but the student's
            assert canned not in flat, canned


def write_submission(folders: dict, run: str, cider: float, clip_score: float) -> None:
    write_json(folders["p2"] / "submission.json", {"run": run, "rule": f"{run} was chosen (fabricated rule)",
                                                   "checkpoint_sha256": "cd" * 32})
    scores = json.loads((folders["p2"] / "val_scores.json").read_text())
    write_json(folders["p2"] / "val_scores.json", {**scores, "CIDEr": cider, "CLIPScore": clip_score})


def add_scst_run(folders: dict, name: str = "toy_lora_scst") -> None:
    xe = folders["p2"] / "toy_lora"
    summary = json.loads((xe / "summary.json").read_text())
    write_json(folders["p2"] / name / "summary.json", {
        **summary, "stage": "scst", "init": str(xe / "best.pt"), "encoder": "timm:vit_so400m_patch14_siglip_384.webli",
        "best": {"CIDEr": 1.2345, "CLIPScore": 0.7654}, "decode": {"beam_size": 3}})
    png(folders["p2"] / name / "curves.png", (1100, 400))


@pytest.mark.parametrize("run, method, encoder, cider, clip_score", [
    ("toy_prefix", "prefix", "clip.pt", 0.8123, 0.6987),
    ("toy_lora_scst", "lora", "vit_so400m.webli", 1.0419, 0.7251),  # a self-critical run: its own summary
])
def test_the_best_setting_is_the_submitted_run_with_the_scores_of_its_captions(tmp_path, capsys, run, method,
                                                                                encoder, cider, clip_score):
    """The line names submission.json's run (not the best run by training CIDEr) and val_scores.json's numbers (not
    the run's own validation): a report printing another run, or another run's numbers, fails here."""
    folders = fabricate(tmp_path)
    add_scst_run(folders)
    write_submission(folders, run, cider, clip_score)
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    text = pdf_text(out)
    assert BEST_SETTING.findall(text) == [(run, method, encoder, f"{cider:.3f}", f"{clip_score:.3f}")]
    after = text[text.index("Best setting:"):]
    assert "hw3_2.sh" in after[:400] and "p2_evaluate.py" in after[:400] and "TA reproduces" in after[:400]
    assert f"How the run was chosen: {run} was chosen (fabricated rule)." in after
    assert "cdcdcdcdcdcdcdcd" in after[:400]  # the submitted checkpoint's hash
    assert "Best setting by val CIDEr" not in text


def test_submitted_on_the_command_line_overrides_submission_json(tmp_path, capsys):
    folders = fabricate(tmp_path)
    out = tmp_path / "r.pdf"
    make_report.main([*arguments(folders, out), "--submitted", "toy_lora"])
    text = pdf_text(out)
    assert BEST_SETTING.findall(text) == [("toy_lora", "lora", "clip.pt", "0.934", "0.712")]
    assert "How the run was chosen: named on the command line (make_report.py --submitted)." in text


def test_a_submission_without_its_files_is_an_error(tmp_path, capsys):
    folders = fabricate(tmp_path)
    write_submission(folders, "toy_gone", 0.5, 0.5)
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert "the submitted run 'toy_gone' has no summary.json" in message and "toy_adapter" in message
    (folders["p2"] / "submission.json").unlink()
    (folders["p2"] / "val_scores.json").unlink()
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert message.startswith("make_report.py: error: missing inputs:")
    missing = [line.strip()[2:] for line in message.splitlines()[1:]]
    submission = [line for line in missing if line.startswith(str(folders["p2"] / "submission.json"))]
    assert len(submission) == 1 and "make_report.py --submitted RUN" in submission[0]
    assert sum(line.startswith(str(folders["p2"] / "val_scores.json")) for line in missing) == 1
    assert not (tmp_path / "r.pdf").exists()


def test_every_page_of_a_toy_report_says_so_and_no_page_of_a_course_report(tmp_path, capsys):
    folders = fabricate(tmp_path)
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    pages = pdf_pages(out)
    assert len(pages) == page_count(out)
    assert all(report.TOY_BANNER in page for page in pages), [page[-200:] for page in pages]
    assert TOY_REPORT_MARK in out.read_bytes()  # what the submission check refuses
    set_summaries(folders, data="course data hw3_data/p2_data")
    shutil.rmtree(folders["p3"] / "grounding")
    build(folders, out, capsys)
    assert not any("TOY WORLD" in page for page in pdf_pages(out))
    assert TOY_REPORT_MARK not in out.read_bytes()


def test_the_pages_name_no_folder_of_this_machine_and_no_date(tmp_path, capsys):
    """Result files name absolute paths (checkpoints, data, the world, layer reasons) and dates; the pages show run
    names, file names and hashes only."""
    folders = fabricate(tmp_path)
    set_summaries(folders, data=f"data {tmp_path}/hw3_data/p2_data", config_file=f"{tmp_path}/configs/x.yaml")
    for path in folders["p3"].rglob("attention.json"):
        info = json.loads(path.read_text())
        info.update(checkpoint=str(folders["p2"] / "toy_adapter" / "best.pt"),
                    layer_reason=f"best grounding layer measured in {folders['p3']}/grounding/grounding.json")
        path.write_text(json.dumps(info))
    out = tmp_path / "r.pdf"
    for data, named in [("toy", "TOY WORLD"), ("course", "Course data (hw3_data): data p2_data")]:
        if data == "course":
            shutil.rmtree(folders["p3"] / "grounding")  # which named the toy world's folder
        build(folders, out, capsys)
        text = pdf_text(out)
        for machine in [str(tmp_path), "/tmp", "pytest-", "../", "~/", "hw3_data/p2_data"]:
            assert machine not in text, (data, machine)
        assert re.findall(r"(?<![\w.~$])/[\w.-]+/", text) == []  # no absolute path ("ViT-B/32" would pass)
        assert re.findall(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d", text) == []  # no date, no time
        for expected in [named, "best.pt of run toy_adapter", "measured in grounding.json", "x.yaml",
                         "500 images, annotations val.json, CLIPScore with clip.pt"]:
            assert expected in text, (data, expected)
        assert b"CreationDate" not in out.read_bytes()


def text_outside(figure, renderer) -> List[str]:
    """The texts of `figure` drawn past its edges (table cells and titles included; hidden axes' labels not)."""
    page = figure.bbox
    outside = []
    for text in figure.findobj(lambda artist: isinstance(artist, Text)):
        axes = text.axes
        if not text.get_visible() or not text.get_text() or (axes is not None and not axes.axison and
                                                               text in axes.get_xticklabels() + axes.get_yticklabels()):
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < page.x0 - 0.5 or box.x1 > page.x1 + 0.5 or box.y0 < page.y0 - 0.5 or box.y1 > page.y1 + 0.5:
            outside.append(text.get_text()[:60])
    return outside


def test_every_text_lies_within_its_page(tmp_path):
    """Drawn with an Agg canvas, every text's extent lies inside its page: long titles wrap, long notes run on to
    new pages, a word wider than the page breaks."""
    folders = fabricate(tmp_path)
    notes = tmp_path / "notes.md"
    long_word = "https://example.org/" + "a" * 150
    notes.write_text("## P1 Q1\n" + ("A long answer about contrastive pretraining. " * 40 + "\n\n") * 8 +
                     "## P2\n" + long_word + "\n")
    inputs = report.collect_inputs(folders["p1"], folders["p2"], folders["p3"], None, notes=notes)
    pages = report.report_pages(inputs)
    assert len(pages) > 12  # the long answer ran on
    for number, figure in enumerate(pages, 1):
        assert text_outside(figure, FigureCanvasAgg(figure).get_renderer()) == [], number


def test_the_page_check_sees_a_title_past_the_edge():
    title = "Problem 2: training curves (loss; val CIDEr and CLIPScore), the best run of each method"
    figure = Figure(figsize=report.PAGE)
    figure.text(0.06, 0.965, title, fontsize=15, weight="bold", va="top")  # on one line
    assert text_outside(figure, FigureCanvasAgg(figure).get_renderer()) == [title[:60]]
    page, _ = report.new_page(title)
    assert text_outside(page, FigureCanvasAgg(page).get_renderer()) == []


def write_notes(path: Path) -> Path:
    path.write_text("""Notes of r12345678 (ignored before the first heading)

## P1 Q1
> a fact the draft wrote
Quokka answer one, first paragraph,
continued on a second line.

Quokka answer one, second paragraph.
TODO: your answer

## P3 Q3
Quokka answer four.

## P1 Q2
Quokka answer two.
## P2
> a fact
TODO: your answer
""")
    return path


def test_notes_sections_go_on_their_pages_and_facts_and_todos_do_not(tmp_path, capsys):
    folders = fabricate(tmp_path)
    set_summaries(folders, data="course data hw3_data/p2_data")
    shutil.rmtree(folders["p3"] / "grounding")
    out = tmp_path / "r.pdf"
    make_report.main([*arguments(folders, out), "--notes", str(write_notes(tmp_path / "notes.md"))])
    assert "still to be written by the student: P2 (" in capsys.readouterr().out
    pages = pdf_pages(out)
    p1 = next(page for page in pages if page.startswith("Problem 1: zero-shot"))
    assert p1.index("1. Why CLIP") < p1.index("Quokka answer one, first paragraph, continued on a second line.") \
        < p1.index("Quokka answer one, second paragraph.") < p1.index("2. Prompts") \
        < p1.index("a photo of a {object}.") < p1.index("Quokka answer two.")
    p2 = next(page for page in pages if page.startswith("Problem 2: PEFT captioning"))
    assert p2.index("Discussion") < p2.index("TO BE WRITTEN BY THE STUDENT: Discuss your best setting")
    p3 = next(page for page in pages if page.startswith("Problem 3: how the maps are made"))
    assert p3.index("3. Is the caption reasonable?") < p3.index("Quokka answer four.")
    text = " ".join(pages)
    for never in ["fact", "TODO", "ignored before", "r12345678"]:
        assert never not in text, never
    inputs = report.collect_inputs(folders["p1"], folders["p2"], folders["p3"], None, notes=tmp_path / "notes.md")
    answer_one = [t.get_text() for figure in report.report_pages(inputs) for t in figure.texts
                  if "Quokka answer one" in t.get_text()]
    assert [text.count("\n\n") for text in answer_one] == [1]  # the paragraphs stay apart


def test_notes_with_an_unknown_or_repeated_heading_are_refused(tmp_path, capsys):
    folders = fabricate(tmp_path)
    notes = tmp_path / "notes.md"
    for text, expected in [("## P1 Q1\nA.\n## P2 Q1\nB.\n", "line 3: unknown heading '## P2 Q1'"),
                           ("## P2\nA.\n## P2\nB.\n", "line 3: '## P2' appears twice")]:
        notes.write_text(text)
        with pytest.raises(SystemExit):
            run_cli(lambda: make_report.main([*arguments(folders, tmp_path / "r.pdf"), "--notes", str(notes)]),
                    "make_report.py")
        assert expected in capsys.readouterr().err
    assert notes_module.read_notes(write_notes(notes)) == {
        "P1 Q1": "Quokka answer one, first paragraph, continued on a second line.\n\n"
                 "Quokka answer one, second paragraph.", "P1 Q2": "Quokka answer two.", "P3 Q3": "Quokka answer four."}


def test_unwritten_answers_are_loud_on_course_data_and_quiet_on_the_toy_world(tmp_path):
    folders = fabricate(tmp_path)
    toy = report.report_pages(report.collect_inputs(folders["p1"], folders["p2"], folders["p3"], None))
    set_summaries(folders, data="course data hw3_data/p2_data")
    shutil.rmtree(folders["p3"] / "grounding")
    course = report.report_pages(report.collect_inputs(folders["p1"], folders["p2"], folders["p3"], None))

    def marks(pages, words: str) -> List[Text]:
        return [t for figure in pages for t in figure.texts if words in t.get_text()]
    loud = marks(course, "TO BE WRITTEN BY THE STUDENT: ")
    assert [" ".join(t.get_text().split(": ", 1)[1].split()) for t in loud] == list(notes_module.QUESTIONS.values())
    assert all(to_hex(t.get_color()) == "#ff0000" and t.get_weight() == "bold" and t.get_fontsize() >= 10
               for t in loud)
    assert marks(toy, "TO BE WRITTEN") == []
    quiet = marks(toy, "The student's answer goes here")
    assert len(quiet) == 4 and all(t.get_weight() == "normal" and to_hex(t.get_color()) != "#ff0000" for t in quiet)


def test_draft_notes_hold_the_facts_and_are_never_written_over(tmp_path, capsys):
    folders = fabricate(tmp_path)
    draft = tmp_path / "notes" / "notes.md"
    make_report.main([*arguments(folders, tmp_path / "r.pdf"), "--draft-notes", str(draft)])
    assert f"wrote {draft}" in capsys.readouterr().out and not (tmp_path / "r.pdf").exists()
    sections = re.split(r"^## ", draft.read_text(), flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == list(notes_module.QUESTIONS)
    for heading, fact in [
            ("P1 Q2", "> 'This is not a photo of {object}' (clip.pt): 69.52% without flip, 70.52% with flip"),
            ("P1 Q2", "> submitted setting: 'cifar18' (18 templates, synonyms False, flip True): 81.40%"),
            ("P2", "> Best setting: toy_adapter (adapter, clip.pt): val CIDEr 0.934, CLIPScore 0.712"),
            ("P2", "> toy_prefix (prefix, clip.pt): best epoch 2, val CIDEr 0.9100, CLIPScore 0.7010 (beam 3); "
                   "12,346 parameters in the checkpoint, 20,001 trained"),
            ("P3 Q3", "> top-1 val image by CLIPScore: 111, CLIPScore 0.8765, CIDEr 0.5000: \"A star.\""),
            ("P3 Q3", "> last-1 val image by CLIPScore: 222, CLIPScore 0.4321"),
            ("P3 Q3", "> bike: \"An orange star and a red triangle.\"; attention peaks: An: top left, 12% of the "
                      "attention | orange: top left, 12% of the attention. Objects in the image: orange star;")]:
        section = next(s for s in sections if s.startswith(heading + "\n"))
        assert fact in section, (heading, fact)
    assert all(s.rstrip().endswith("TODO: your answer") for s in sections)
    assert notes_module.read_notes(draft) == {}  # facts and TODOs are no answer
    draft.write_text("## P2\nMine.\n")
    with pytest.raises(SystemExit):
        run_cli(lambda: make_report.main([*arguments(folders, tmp_path / "r.pdf"), "--draft-notes", str(draft)]),
                "make_report.py")
    assert "exists: a draft never replaces notes" in capsys.readouterr().err
    assert draft.read_text() == "## P2\nMine.\n"


def test_student_id_names_the_report_as_the_course_asks(tmp_path, capsys):
    folders = fabricate(tmp_path)
    out = tmp_path / "results" / "hw3_report.pdf"
    make_report.main([*arguments(folders, out), "--student-id", "r12345678"])
    written = tmp_path / "results" / "hw3_r12345678.pdf"
    assert f"wrote {written} (" in capsys.readouterr().out
    assert written.is_file() and not out.exists()


@pytest.mark.parametrize("student_id", ["r1234/../x", "r12 345", "", "r12345678.pdf", "\u5b78\u865f"])
def test_a_bad_student_id_is_one_line_error(tmp_path, capsys, student_id):
    folders = fabricate(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: make_report.main([*arguments(folders, tmp_path / "hw3_report.pdf"), "--student-id",
                                          student_id]), "make_report.py")
    assert exit_.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith(f"make_report.py: error: --student-id {student_id!r}: give letters and digits only")
    assert error.count("\n") == 1 and list(tmp_path.rglob("*.pdf")) == []


def test_shown_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    assert shown_path(tmp_path / "cache" / "toyworld-seed0") == "$HW3_CACHE/toyworld-seed0"
    assert shown_path(ROOT / "results" / "p1") == "results/p1"
    elsewhere = shown_path("/elsewhere/p2")  # relative to the repository
    assert not Path(elsewhere).is_absolute() and Path(os.path.normpath(ROOT / elsewhere)) == Path("/elsewhere/p2")
    assert shown_text(f"CLIP ViT-B/32 on {ROOT}/results/p2/x.json.") == "CLIP ViT-B/32 on results/p2/x.json."


def test_report_without_grounding_says_so(tmp_path, capsys):
    folders = fabricate(tmp_path)
    shutil.rmtree(folders["p3"] / "grounding")
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    assert page_count(out) == 12
    assert "2.50x" not in pdf_streams_text(out)
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True).stdout
        assert "Grounding: not measured (it needs the toy world" in " ".join(text.split())


def test_missing_inputs_are_listed_together(tmp_path, capsys):
    folders = fabricate(tmp_path)
    (folders["p1"] / "top5.png").unlink()
    shutil.rmtree(folders["p2"] / "toy_prefix")
    (folders["p3"] / "images" / "girl.png").unlink()
    shutil.rmtree(folders["p3"] / "top_last")
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert message.startswith("make_report.py: error: missing inputs:")
    for expected in ["top5.png", "method 'prefix'", "girl.png", "top-1/last-1 records"]:
        assert expected in message
    assert not (tmp_path / "r.pdf").exists()


def test_encoder_candidates_get_a_row_each_and_the_best_run_of_a_method_its_curves(tmp_path, capsys):
    folders = fabricate(tmp_path)
    candidate = folders["p2"] / "siglip_adapter"
    summary = json.loads((folders["p2"] / "toy_adapter" / "summary.json").read_text())
    write_json(candidate / "summary.json", {**summary, "encoder": "timm:vit_so400m_patch14_siglip_384.webli",
                                            "best": {"CIDEr": 0.9876, "CLIPScore": 0.7654}})
    png(candidate / "curves.png", (1100, 400))
    inputs = report.collect_inputs(folders["p1"], folders["p2"], folders["p3"], None)
    assert sorted(inputs.summaries) == ["siglip_adapter", "toy_adapter", "toy_lora", "toy_prefix"]
    assert report.best_run_per_method(inputs.summaries) == {"adapter": "siglip_adapter", "prefix": "toy_prefix",
                                                            "lora": "toy_lora"}
    assert report.encoder_name(inputs.summaries["siglip_adapter"]) == "vit_so400m.webli"
    assert report.encoder_name(inputs.summaries["toy_lora"]) == "clip.pt"
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    assert "0.9876" in pdf_streams_text(out) and "0.9100" in pdf_streams_text(out)  # the candidate's row and adapter's


@pytest.mark.parametrize("run, key", [("toy_lora", "checkpoint_params"), ("toy_prefix", "data")])
def test_malformed_summary_is_named(tmp_path, capsys, run, key):
    folders = fabricate(tmp_path)
    summary_path = folders["p2"] / run / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary[key]
    summary_path.write_text(json.dumps(summary))
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert message.startswith("make_report.py: error: malformed inputs:")
    assert f"{run}/summary.json lacks ['{key}']" in message
    assert not (tmp_path / "r.pdf").exists()


def test_course_data_summaries_name_no_toy_world(tmp_path, capsys):
    folders = fabricate(tmp_path)
    set_summaries(folders, data="course data hw3_data/p2_data")
    shutil.rmtree(folders["p3"] / "grounding")
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    streams = pdf_streams_text(out)
    assert "0.890" not in streams and "feedc0ffee123456" not in streams  # nothing read from the toy world
    if shutil.which("pdftotext"):
        text = " ".join(subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True).stdout.split())
        assert "Course data (hw3_data): course data hw3_data/p2_data" in text and "TOY WORLD" not in text

    make_report.main([*arguments(folders, out), "--toy-world", str(folders["world"])])  # named on the command line
    assert "0.890" in pdf_streams_text(out)


def test_missing_toy_world_is_named(tmp_path, capsys):
    folders = fabricate(tmp_path)
    grounding_path = next(folders["p3"].rglob("grounding.json"))
    grounding_path.write_text(json.dumps({**json.loads(grounding_path.read_text()), "world": str(tmp_path / "gone")}))
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert f"{tmp_path / 'gone' / 'toyworld.json'} (the toy world the results name)" in message


def test_invalid_json_is_named(tmp_path, capsys):
    folders = fabricate(tmp_path)
    (folders["p1"] / "summary.json").write_text("{not json")
    message = build_error(folders, tmp_path / "r.pdf", capsys)
    assert message.startswith(f"make_report.py: error: {folders['p1'] / 'summary.json'} is not valid JSON")


def test_interrupted_write_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    folders = fabricate(tmp_path)
    out = tmp_path / "out" / "hw3_report.pdf"
    out.parent.mkdir()
    out.write_bytes(b"the previous report")

    class BrokenPdf(report.PdfPages):
        def savefig(self, figure=None, **kwargs):
            super().savefig(figure, **kwargs)
            raise RuntimeError("disk full")  # after the first page has been written

    monkeypatch.setattr(report, "PdfPages", BrokenPdf)
    with pytest.raises(RuntimeError, match="disk full"):
        build(folders, out, capsys)
    assert out.read_bytes() == b"the previous report"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hw3_report.pdf"]  # no temporary file left


def test_help_names_the_notes_headings_the_reader_accepts():
    """--help tells the student how to head each answer: exactly the headings hw3/notes.py reads, in its order (its
    options, and that it runs at all, are tests/test_docs_commands.py's check)."""
    result = subprocess.run([sys.executable, str(ROOT / "make_report.py"), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^\s+## (.+?)(?:\s{2,}|$)", result.stdout, re.M) == list(notes_module.QUESTIONS)
    for expected in ["--toy-world", "submission.json", "val_scores.json", "--draft-notes", "hw3_<ID>.pdf"]:
        assert expected in result.stdout, expected


def test_an_scst_run_gets_its_own_row_beside_the_run_it_started_from(tmp_path, capsys):
    folders = fabricate(tmp_path)
    xe = folders["p2"] / "toy_lora"
    scst = folders["p2"] / "toy_lora_scst"
    summary = json.loads((xe / "summary.json").read_text())
    write_json(scst / "summary.json", {**summary, "stage": "scst", "init": str(xe / "best.pt"),
                                       "best": {"CIDEr": 1.2345, "CLIPScore": 0.7654}, "decode": {"beam_size": 3}})
    png(scst / "curves.png", (1100, 400))
    out = tmp_path / "hw3_report.pdf"
    build(folders, out, capsys)
    streams = pdf_streams_text(out)
    assert "1.2345" in streams and "0.7654" in streams  # the SCST row
    assert "0.9200" in streams  # the cross-entropy lora run is still the method's row (0.9 + 2 / 100)
