"""make_report.py (hw3/report.py): a report built from small fabricated (but well-formed) result files has the
expected pages and the numbers of those files; missing or malformed inputs give one clear error listing them."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import make_report
from hw3 import report
from hw3.common.errors import EXIT_USER_ERROR, run_cli
from hw3.common.files import shown_path, shown_text

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
                                        "annotation_file": "val.json", "clip_model": "clip.pt", "tokenizer": "ptb"})


def fabricate_p3(p3: Path, world: Path) -> None:
    common = {"checkpoint": "runs/toy_lora/best.safetensors", "checkpoint_sha256": "ab" * 32, "layer": 1,
              "layer_reason": "best grounding layer measured", "head": None, "decode": {"beam_size": 3},
              "created_at": "2026-11-23T11:00:00"}
    records = []
    for name in P3_NAMES:
        png(p3 / "images" / f"{name}.png", (1400, 1100))
        records.append({"name": name, "file": f"/data/{name}.jpg", "figure": f"elsewhere/{name}.png",
                        "caption": "An orange star and a red triangle.", "cls_share": 0.2})
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


def test_report_pages_and_numbers_come_from_the_result_files(tmp_path, capsys):
    folders = fabricate(tmp_path)
    out = tmp_path / "report" / "hw3_report.pdf"
    printed = build(folders, out, capsys)
    # cover, P1 text + top-5, P2 table + curves, 5 tall p3 figures one a page, 2 wide top/last on one, analysis
    pages = 1 + 2 + 2 + 5 + 1 + 1
    assert page_count(out) == pages and f"({pages} pages)" in printed
    streams = pdf_streams_text(out)
    # 0.890: the tiny CLIP's accuracy, from the toyworld.json of the world grounding.json names
    for expected in ["0.9345", "0.8765", "0.4321", "12,346", "feedc0ffee123456", "2.50x", "0.890"]:
        assert expected in streams, expected
    if shutil.which("pdftotext"):  # the whole text (poppler-utils is not part of the environment)
        text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True, text=True).stdout
        flat = " ".join(text.split())
        for expected in ["TOY WORLD", "feedc0ffee123456", "0.890", "This is not a photo of {object}", "69.52",
                         "70.52", "81.40%", "12,346", "0.9200", "0.7020", "Best setting by val CIDEr: toy_lora",
                         "CIDEr 0.9345", "top1 by CLIPScore: 111 (CLIPScore 0.8765", "last1", "0.4321",
                         "2.50x", "meets the 2x target", "Objects in the image: orange star",
                         "1 of them present", "Layer 1 grounds best: 30.0%"]:
            assert expected in flat, expected
        prompts = flat[flat.index("2. Prompts"):]
        assert prompts.index("This is a photo of {object}") < prompts.index("a photo of a {object}.")  # required first


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="needs pdftotext (poppler-utils) to read the text")
def test_paths_on_the_pages_name_no_machine(tmp_path, capsys, monkeypatch):
    """Result files under the cache root are shown as ~/.cache/dlcv-hw3/..., never as this machine's path."""
    monkeypatch.delenv("HW3_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folders = fabricate(tmp_path / "home" / ".cache" / "dlcv-hw3" / "results")
    out = tmp_path / "r.pdf"
    build(folders, out, capsys)
    text = " ".join(subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True).stdout.split())
    assert str(tmp_path) not in text
    assert "TOY WORLD (toyworld.py, offline synthetic stand-in for hw3_data; not the course data): " \
           "~/.cache/dlcv-hw3/results/world," in text
    assert "results ~/.cache/dlcv-hw3/results/p1 (written" in text


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


def test_help_works():
    result = subprocess.run([sys.executable, str(ROOT / "make_report.py"), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--p2-runs" in result.stdout and "--toy-world" in result.stdout


def test_an_scst_run_gets_its_own_row_beside_the_run_it_started_from(tmp_path, capsys):
    folders = fabricate(tmp_path)
    xe = folders["p2"] / "toy_lora"
    scst = folders["p2"] / "toy_lora_scst"
    summary = json.loads((xe / "summary.json").read_text())
    write_json(scst / "summary.json", {**summary, "stage": "scst", "init": str(xe / "best.safetensors"),
                                       "best": {"CIDEr": 1.2345, "CLIPScore": 0.7654}, "decode": {"beam_size": 3}})
    png(scst / "curves.png", (1100, 400))
    out = tmp_path / "hw3_report.pdf"
    build(folders, out, capsys)
    streams = pdf_streams_text(out)
    assert "1.2345" in streams and "0.7654" in streams  # the SCST row
    assert "0.9200" in streams  # the cross-entropy lora run is still the method's row (0.9 + 2 / 100)
