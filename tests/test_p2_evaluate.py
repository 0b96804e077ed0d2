"""p2_evaluate.py: the course's CLI and output line, the key check, and the extras (CSV, JSON, other metrics)."""
import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import p2_evaluate
from hw3.common.clip_models import load_clip
from hw3.common.errors import run_cli as run_main
from scoring_fixtures import (CAPTIONS, caption_set, course_clip_scores, pycocoevalcap_cider,  # noqa: F401
                              tiny_clip_path)

RESULT_LINE = re.compile(r"^CIDEr: (\S+) \| CLIPScore: (\S+)$")


def run_cli(caption_set, tiny_clip_path, *extra):
    return p2_evaluate.main(["--pred_file", caption_set["pred_file"], "--images_root", caption_set["images"],
                             "--annotation_file", caption_set["annotations"], "--clip-model", tiny_clip_path,
                             "--num-workers", "0", *extra])


def cli_error(argv, capsys) -> str:
    """The error line p2_evaluate.py ends with for `argv` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: p2_evaluate.main(argv), "p2_evaluate.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("p2_evaluate.py: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_prints_the_course_line_with_the_course_numbers(caption_set, tiny_clip_path, capsys, tmp_path):  # noqa: F811
    csv_path, json_path = tmp_path / "out" / "scores.csv", tmp_path / "out" / "summary.json"
    run_cli(caption_set, tiny_clip_path, "--per-image-csv", str(csv_path), "--json-out", str(json_path))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    match = RESULT_LINE.match(last_line)
    assert match, last_line

    predictions = caption_set["predictions"]
    cider, cider_per_image = pycocoevalcap_cider(predictions, {k: refs for k, (refs, _) in CAPTIONS.items()})
    clip_scores = course_clip_scores(*load_clip(tiny_clip_path), predictions, caption_set["images"])
    assert abs(float(match.group(1)) - cider) < 1e-9
    assert float(match.group(2)) == sum(clip_scores.values()) / len(clip_scores)

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [row["file_name"] for row in rows] == sorted((f"{k}.jpg" for k in predictions),
                                                        key=lambda name: -clip_scores[name[:-4]])
    for row in rows:
        key = row["file_name"][:-4]
        assert row["caption"] == predictions[key]
        assert abs(float(row["cider"]) - cider_per_image[key]) < 1e-9
        assert float(row["clip_score"]) == pytest.approx(clip_scores[key], abs=1e-12)

    summary = json.loads(json_path.read_text())
    assert summary["num_images"] == len(predictions) and summary["tokenizer"] == "ptb"
    assert summary["top1_clip_score"]["file_name"] == rows[0]["file_name"]
    assert summary["last1_clip_score"]["file_name"] == rows[-1]["file_name"]


def test_key_mismatch_names_the_keys(caption_set, tiny_clip_path, tmp_path, capsys):  # noqa: F811
    predictions = dict(caption_set["predictions"])
    del predictions["000003"]
    predictions["999999"] = "a dog"
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(predictions))
    err = cli_error(["--pred_file", str(pred_file), "--images_root", caption_set["images"],
                     "--annotation_file", caption_set["annotations"], "--clip-model", tiny_clip_path], capsys)
    assert re.search(r"no prediction, e.g. \['000003'\].*not annotated images, e.g. \['999999'\]", err)


@pytest.mark.parametrize("content,message", [(None, "prediction file not found"), ("{", "not valid JSON"),
                                             ('["a"]', "JSON object")])
def test_bad_prediction_files_are_clear_errors(caption_set, tmp_path, content, message, capsys):  # noqa: F811
    pred_file = tmp_path / "pred.json"
    if content is not None:
        pred_file.write_text(content)
    err = cli_error(["--pred_file", str(pred_file), "--images_root", caption_set["images"],
                     "--annotation_file", caption_set["annotations"]], capsys)
    assert message in err


@pytest.mark.slow  # METEOR starts a JVM that loads its paraphrase table (about 10 s, twice)
def test_all_metrics_equal_pycocoevalcap(caption_set, tiny_clip_path, tmp_path):  # noqa: F811
    result = run_cli(caption_set, tiny_clip_path, "--all-metrics")
    predictions = caption_set["predictions"]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": c} for c in refs] for key, (refs, _) in CAPTIONS.items()})
    res = tokenizer.tokenize({key: [{"caption": c}] for key, c in predictions.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    assert abs(result["BLEU-4"] - bleu[3]) < 1e-12
    assert abs(result["METEOR"] - Meteor().compute_score(gts, res)[0]) < 1e-12
    assert abs(result["ROUGE-L"] - Rouge().compute_score(gts, res)[0]) < 1e-12
    assert 0 < result["METEOR"] < 1 and 0 < result["ROUGE-L"] < 1


def test_simple_tokenizer_is_labelled(caption_set, tiny_clip_path, capsys):  # noqa: F811
    run_cli(caption_set, tiny_clip_path, "--tokenizer", "simple")
    out = capsys.readouterr().out
    assert "APPROXIMATION" in out and RESULT_LINE.match(out.strip().splitlines()[-1])


def test_missing_clip_checkpoint_is_a_clear_error(caption_set, tmp_path, capsys):  # noqa: F811
    err = cli_error(["--pred_file", caption_set["pred_file"], "--images_root", caption_set["images"],
                     "--annotation_file", caption_set["annotations"],
                     "--clip-model", str(tmp_path / "no_such_clip.pt")], capsys)
    assert re.search("cannot load CLIP .*no_such_clip.pt", err)


@pytest.mark.parametrize("content, workers", [(b"", "2"), (b"\xff\xd8\xff not a JPEG", "0")],
                         ids=["zero-byte, loader workers", "garbage, no workers"])
def test_an_unreadable_image_is_one_error_line_naming_it(caption_set, tiny_clip_path, tmp_path, content,  # noqa: F811
                                                         workers):
    """Read in the main process or in a loader worker (--num-workers), an image that does not decode ends the
    scorer with one line naming the file, exit status 2, no traceback."""
    images = Path(shutil.copytree(caption_set["images"], tmp_path / "images"))
    (images / "000004.jpg").write_bytes(content)
    result = subprocess.run([sys.executable, str(Path(p2_evaluate.__file__)), "--pred_file", caption_set["pred_file"],
                             "--images_root", str(images), "--annotation_file", caption_set["annotations"],
                             "--clip-model", tiny_clip_path, "--tokenizer", "simple", "--num-workers", workers],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("p2_evaluate.py: error: cannot read image "), result.stderr
    assert str(images / "000004.jpg") in errors[0] and "CIDEr:" not in result.stdout
