"""hw3/p3 (attention, grounding, commands) + p3_attention.py: the attention read back equals what decoding used, the
grid lands on the part of the image the encoder saw, words and panels follow the course's layout, grounding shares
are exact on constructed maps, and the CLI / notebook produce figures on the toy world."""
import ast
import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from clip.model import CLIP
from PIL import Image
from torchvision import transforms

from decoder import Decoder, GPTConfig, course_state_dict
from hw3.common.clip_models import clip_transform
from hw3.common.errors import EXIT_USER_ERROR, run_cli
from hw3.p2.checkpoint import save_trainable
from hw3.p2.generation import DecodeConfig, generate
from hw3.p2.model import CaptionConfig, build_caption_model
from hw3.p3 import attention as am
from hw3.p3.attention import peak_region
from hw3.p3 import grounding
from hw3.toy.world import ToyWorld
from tokenizer import EOT_ID, BPETokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY_GPT = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=50257, block_size=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny captioner (4x4-patch CLIP, 3-layer GPT with the real vocabulary), cross-attention in layers 1 and 2,
    trainable tensors randomised so that captions and attention depend on the image."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 1, 1).state_dict(), str(folder / "clip.pt"))
    torch.save(course_state_dict(Decoder(TINY_GPT)), str(folder / "decoder_model.bin"))
    config = CaptionConfig(encoder=str(folder / "clip.pt"), decoder=TINY_GPT, context_width=48,
                           cross_attn_layers=[1, 2], cross_attn_width=32, cross_attn_heads=4, peft=["lora"],
                           lora_rank=2)
    built = build_caption_model(config, str(folder / "decoder_model.bin"))
    with torch.no_grad():
        for param in built.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.3)
    return built.eval()


def noise_images(count, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def greedy_with_attention(model, pixels, steps):
    """A plain incremental greedy decode (KV cache, one token per step) recording the cross-attention of each step:
    returns tokens [B, steps] and {layer: [B, heads, steps, N]}."""
    context = model.image_context(model.encode_images(pixels))
    ids = torch.full((pixels.shape[0], 1), EOT_ID, dtype=torch.long)
    past, recorded = None, []
    model.record_attention(True)
    with torch.no_grad():
        for _ in range(steps):
            logits, past = model.decode_step(ids[:, -1:], context, past)
            recorded.append(model.attention_maps())
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.record_attention(False)
    return ids[:, 1:], {layer: torch.cat([step[layer] for step in recorded], dim=2) for layer in recorded[0]}


def test_teacher_forced_attention_equals_the_incremental_decode(model):
    pixels = torch.stack([model.encoder.preprocess(image) for image in noise_images(3)])
    tokens, incremental = greedy_with_attention(model, pixels, steps=6)
    captions = [tokens[0, :5].tolist(), tokens[1].tolist()[:-1], tokens[2, :2].tolist()]  # different lengths
    results = am.attention_for_captions(model, pixels, captions)
    assert sorted(incremental) == [1, 2]
    n_prefix, grid = model.encoder.n_prefix_tokens, model.encoder.grid
    for row, (caption, (maps, prefix_share)) in enumerate(zip(captions, results)):
        for layer, steps in incremental.items():
            expected = steps[row, :, :len(caption) + 1]  # [heads, n + 1, N]
            patches = expected[..., n_prefix:]
            assert torch.allclose(prefix_share[layer], expected[..., :n_prefix].sum(-1), atol=1e-5)
            expected_maps = (patches / patches.sum(-1, keepdim=True)).reshape(4, len(caption) + 1, *grid)
            assert maps[layer].shape == (4, len(caption) + 1, 4, 4)
            assert torch.allclose(maps[layer], expected_maps, atol=1e-5)
            assert torch.allclose(maps[layer].sum((-2, -1)), torch.ones(4, len(caption) + 1), atol=1e-5)
    assert not any(block.cross_attn.record_attention for block in model.decoder.transformer.h
                   if block.cross_attn is not None)  # recording is switched off again


def test_caption_images_reads_the_final_beam(model):
    """Beam search reorders beams; the maps belong to the caption it returned (checked by decoding that caption
    step by step with the cache and comparing each step's attention)."""
    images = noise_images(2, size=(50, 34), seed=1)
    config = DecodeConfig(beam_size=3, max_length=8)
    results = am.caption_images(model, images, config, names=["a", "b"])
    pixels = torch.stack([model.encoder.preprocess(image) for image in images])
    captions = generate(model, model.encode_images(pixels), config)
    for result, caption, pixel in zip(results, captions, pixels):
        assert result.token_ids == caption and result.ended == (len(caption) < 8)
        context = model.image_context(model.encode_images(pixel[None]))
        ids, past = [EOT_ID] + caption, None
        model.record_attention(True)
        for position, token in enumerate(ids):
            with torch.no_grad():
                _, past = model.decode_step(torch.tensor([[token]]), context, past)
            step = model.attention_maps()[2][0, :, 0, 1:]
            assert torch.allclose(result.maps[2][:, position].flatten(1), step / step.sum(-1, keepdim=True),
                                  atol=1e-5)
        model.record_attention(False)
        assert result.view_box == am.encoder_view_box(model.encoder.preprocess, 50, 34)


@pytest.mark.parametrize("size", [(128, 96), (96, 128), (64, 64), (333, 200), (200, 333)])
def test_view_box_matches_what_clips_resize_and_crop_keep(size):
    """An image whose red/green channels encode x/y: the corners of CLIP's crop show where the box starts/ends."""
    width, height = size
    xs = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    ys = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    image = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8))
    crop = np.asarray(transforms.Compose(clip_transform(64).transforms[:2])(image), dtype=np.float64)
    x0, y0, x1, y1 = am.encoder_view_box(clip_transform(64), width, height)
    assert x1 - x0 == pytest.approx(y1 - y0, rel=0.02)  # a square region of the original
    to_x, to_y = 255 / (width - 1), 255 / (height - 1)  # pixel index -> channel value
    pixel = (x1 - x0) / 64  # one crop pixel in original pixels
    assert crop[:, 0, 0].mean() == pytest.approx((x0 + pixel / 2 - 0.5) * to_x, abs=1.5 * pixel * to_x + 1)
    assert crop[:, -1, 0].mean() == pytest.approx((x1 - pixel / 2 - 0.5) * to_x, abs=1.5 * pixel * to_x + 1)
    assert crop[0, :, 1].mean() == pytest.approx((y0 + pixel / 2 - 0.5) * to_y, abs=1.5 * pixel * to_y + 1)
    assert crop[-1, :, 1].mean() == pytest.approx((y1 - pixel / 2 - 0.5) * to_y, abs=1.5 * pixel * to_y + 1)


def test_view_box_for_timm_style_resize_crop_and_no_crop():
    timm_like = transforms.Compose([lambda image: image, transforms.Compose([
        transforms.Resize(248), transforms.CenterCrop(224), transforms.ToTensor()])])
    x0, y0, x1, y1 = am.encoder_view_box(timm_like, 300, 200)
    # 300x200 -> 372x248, crop 224 at (74, 12) -> x 74..298, y 12..236 of 372x248, scaled back by 200/248
    assert (x0, y0, x1, y1) == pytest.approx((74 * 300 / 372, 12 * 200 / 248, 298 * 300 / 372, 236 * 200 / 248))
    assert am.encoder_view_box(transforms.ToTensor(), 300, 200) == (0, 0, 300, 200)


def test_pixel_weights_and_grounding_shares_are_exact():
    grid_map = torch.zeros(4, 4)
    grid_map[1, 2] = 1.0
    weights = am.pixel_weights(grid_map.numpy(), (0, 0, 64, 64), 64, 64)
    assert weights.sum() == pytest.approx(1.0) and weights[16:32, 32:48].sum() == pytest.approx(1.0)
    mask = grounding.box_mask([[32, 16, 48, 32]], 64, 64)
    assert grounding.attention_share(grid_map, (0, 0, 64, 64), mask) == pytest.approx(1.0)
    uniform = torch.full((4, 4), 1 / 16)
    assert grounding.attention_share(uniform, (0, 0, 64, 64), mask) == pytest.approx(1 / 16)
    # a 96x64 image whose middle 64x64 was seen: a box in the unseen left strip gets nothing
    assert grounding.attention_share(uniform, (16, 0, 80, 64), grounding.box_mask([[0, 0, 15, 63]], 96, 64)) == 0
    half = grounding.box_mask([[16, 0, 47.9, 64]], 96, 64)
    assert grounding.attention_share(uniform, (16, 0, 80, 64), half) == pytest.approx(0.5)


def test_word_spans_merge_sub_words_and_keep_punctuation():
    texts = ["cy", "an", " star", ",", " purple", " circle", "."]
    assert am.word_spans(texts) == [("cyan", [0, 1]), ("star", [2]), (",", [3]), ("purple", [4]),
                                    ("circle", [5]), (".", [6])]
    assert [w for w, _ in am.word_spans(texts, merge_subwords=False)] == ["cy", "an", "star", ",", "purple",
                                                                         "circle", "."]
    tokenizer = BPETokenizer()
    ids = tokenizer.encode("Cyan star and don't.")
    assert [w for w, _ in am.word_spans([tokenizer.decode([i]) for i in ids])] == ["Cyan", "star", "and", "don't",
                                                                                   "."]


def fake_result(token_ids, ended=True, layers=(1, 2), size=(80, 60)):
    n = len(token_ids) + 1
    maps = {layer: torch.softmax(torch.randn(4, n, 16), -1).reshape(4, n, 4, 4) for layer in layers}
    return am.CaptionAttention(image=noise_images(1, size)[0], name="fake", token_ids=token_ids, ended=ended,
                               maps=maps, prefix_share={layer: torch.zeros(4, n) for layer in layers},
                               view_box=(10, 0, 70, 60))


def test_figure_follows_the_course_layout():
    tokenizer = BPETokenizer()
    result = fake_result(tokenizer.encode("cyan star, a purple circle."))
    figure = am.plot_caption_attention(result, tokenizer, layer=-1)
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["<|endoftext|>", "cyan", "star", ",", "a", "purple", "circle", ".", "<|endoftext|>"]
    assert "layer 2, heads averaged" in figure._suptitle.get_text()
    assert len(figure.axes[0].images) == 1 and all(len(axis.images) == 2 for axis in figure.axes[1:9])
    cut = fake_result(tokenizer.encode(" red red red"), ended=False)
    titles = [axis.get_title() for axis in am.plot_caption_attention(cut, tokenizer, layer=1, head=3).axes]
    assert [t for t in titles if t] == ["<|endoftext|>", "red", "red", "red"]  # no end panel: cut at max length


def test_word_maps_average_sub_word_tokens_and_pick_heads_and_layers():
    tokenizer = BPETokenizer()
    result = fake_result(tokenizer.encode("cyan star"))
    words = am.caption_words(result, tokenizer)
    assert words == [("cyan", [0, 1]), ("star", [2])]
    panels = am.word_maps(result, words, layer=1, head=0)
    assert torch.allclose(panels[0][1], result.maps[1][0, :2].mean(0))
    assert torch.allclose(panels[-1][1], result.maps[1][0, 3]) and panels[-1][0] == am.END_TITLE
    assert torch.allclose(am.select_maps(result, -1), result.maps[2].mean(0))
    for bad in (dict(layer=0), dict(layer=-3), dict(layer=1, head=4)):
        with pytest.raises(ValueError):
            am.select_maps(result, **bad)


def test_grounding_scores_named_objects_and_counts_absent_ones():
    tokenizer = BPETokenizer()
    result = fake_result(tokenizer.encode(" a red circle and a blue star"), size=(64, 64))
    result.view_box = (0, 0, 64, 64)
    for layer in result.maps:  # layer 1 looks at the red circle's patch for every token, layer 2 everywhere
        result.maps[layer][:] = 1 / 16
    result.maps[1][:] = 0
    result.maps[1][:, :, 0, 0] = 1
    objects = [{"colour": "red", "shape": "circle", "box": [0, 0, 15.9, 15.9]},
               {"colour": "green", "shape": "square", "box": [32, 32, 63, 63]}]
    records = grounding.ground_caption(result, objects, tokenizer, ["red", "blue", "green"], ["circle", "star"])
    assert [(r.word, r.kind, r.objects) for r in records] == [("red", "colour", 1), ("circle", "shape", 1),
                                                              ("blue", "colour", 0), ("star", "shape", 0)]
    rows = grounding.grounding_table(records)
    assert [row["layer"] for row in rows] == [1, 2]
    assert rows[0]["mean_share"] == pytest.approx(1.0) and rows[1]["mean_share"] == pytest.approx(1 / 16)
    assert rows[0]["mean_baseline"] == pytest.approx(1 / 16) and rows[0]["ratio"] == pytest.approx(16)
    summary = grounding.summarise(records, rows)
    assert summary["best_layer"] == 1 and summary["words_scored"] == 2 and summary["words_absent"] == 2


# ---- the CLI and the notebook on the small toy world (untrained cross-attention: plumbing, not quality) ----------

@pytest.fixture(scope="module")
def toy_checkpoint(toy_world_small, tmp_path_factory):
    """A fresh captioner on the small toy world's CLIP and LM, saved like p2_train.py saves one."""
    world = ToyWorld(toy_world_small)
    decoder = GPTConfig.from_state_dict(torch.load(str(world.decoder), map_location="cpu"))
    config = CaptionConfig(encoder=str(world.clip), decoder=decoder, context_width=64, cross_attn_width=64,
                           cross_attn_heads=2, peft=["adapter"], adapter_size=8, encoder_layer=-3)
    torch.manual_seed(0)
    model = build_caption_model(config, str(world.decoder))
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_trainable(model, str(path))
    return path


def model_options(world, checkpoint):
    return ["--checkpoint", str(checkpoint), "--decoder", str(world.decoder), "--max-length", "8",
            "--beam-size", "1"]


def p3_attention(*argv) -> int:
    """p3_attention.py as the shell runs it (errors through run_cli); returns its exit status."""
    import p3_attention as cli
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: cli.main(list(argv)), "p3_attention.py")
    return done.value.code


def test_cli_draws_every_image_and_the_top_and_last_of_a_scores_csv(toy_world_small, toy_checkpoint, tmp_path,
                                                                   capsys):
    world = ToyWorld(toy_world_small)
    assert p3_attention(str(world.p3_images), *model_options(world, toy_checkpoint),
                        "--out-dir", str(tmp_path / "p3")) == 0
    info = json.loads((tmp_path / "p3" / "attention.json").read_text())
    assert sorted(r["name"] for r in info["images"]) == ["bike", "girl", "sheep", "ski", "umbrella"]
    assert info["layer"] == 1 and "last cross-attention layer" in info["layer_reason"] and info["head"] is None
    assert info["decode"] == asdict(DecodeConfig(beam_size=1, max_length=8))
    for record in info["images"]:
        assert Path(record["figure"]).stat().st_size > 10_000 and record["caption"]
        assert [word for word, _ in record["peaks"]] == record["words"]  # one peak per word the figure shows
    assert f"wrote {tmp_path / 'p3' / 'attention.json'}" in capsys.readouterr().out

    val = world.p2_data / "images" / "val"
    names = sorted(os.listdir(val))[:4]
    scores_csv = tmp_path / "scores.csv"
    with open(scores_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "cider", "clip_score"])
        for name, score in zip(names, [0.61, 0.93, 0.12, 0.5]):
            writer.writerow([name, "a caption", 0.5, score])
    assert p3_attention(str(val), "--top-last", str(scores_csv), *model_options(world, toy_checkpoint),
                        "--layer", "0", "--head", "1", "--out-dir", str(tmp_path / "top_last")) == 0
    info = json.loads((tmp_path / "top_last" / "attention.json").read_text())
    assert [(r["rank"], r["name"] + ".jpg", r["clip_score"]) for r in info["images"]] == [
        ("top1", names[1], 0.93), ("last1", names[2], 0.12)]
    assert info["layer"] == 0 and info["head"] == 1
    assert (tmp_path / "top_last" / f"top1_{Path(names[1]).stem}.png").is_file()
    capsys.readouterr()

    with open(scores_csv, "w") as f:
        f.write("file_name,CLIPScore\n" + names[0] + ",0.5\n")
    assert p3_attention(str(val), "--top-last", str(scores_csv), *model_options(world, toy_checkpoint)) \
        == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith("p3_attention.py: error: ") and "Traceback" not in error
    assert "lacks columns ['caption', 'cider', 'clip_score']" in error
    assert p3_attention(str(val), *model_options(world, toy_checkpoint), "--layer", "5") == EXIT_USER_ERROR
    assert "one of the cross-attention layers [0, 1]" in capsys.readouterr().err
    assert p3_attention(str(tmp_path), *model_options(world, toy_checkpoint)) == EXIT_USER_ERROR
    assert f"no image files in {tmp_path}" in capsys.readouterr().err


def test_grounding_cli_writes_a_per_layer_table_and_auto_layer_uses_it(toy_world_small, toy_checkpoint, tmp_path):
    world = ToyWorld(toy_world_small)
    out = tmp_path / "grounding"
    assert p3_attention("grounding", str(world.root), "--checkpoint", str(toy_checkpoint), "--split", "p3",
                        "--max-length", "12", "--beam-size", "1", "--out-dir", str(out)) == 0
    info = json.loads((out / "grounding.json").read_text())
    with open(out / "grounding.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["layer"]) for row in rows] == [0, 1] and info["images"] == 5
    assert info["words_scored"] > 0 and info["best_layer"] in (0, 1)
    assert info["world_hash"] == world.manifest()["hash"] and info["checkpoint"] == str(toy_checkpoint)
    for row, json_row in zip(rows, info["table"]):
        assert float(row["mean_share"]) == pytest.approx(json_row["mean_share"])
        assert 0 < json_row["mean_baseline"] < 1 and json_row["ratio"] == pytest.approx(
            json_row["mean_share"] / json_row["mean_baseline"])
    assert p3_attention(str(world.p3_images), *model_options(world, toy_checkpoint),
                        "--grounding", str(out / "grounding.json"), "--out-dir", str(tmp_path / "p3")) == 0
    figures = json.loads((tmp_path / "p3" / "attention.json").read_text())
    assert figures["layer"] == info["best_layer"] and "best grounding layer" in figures["layer_reason"]


def test_grounding_cli_rejects_a_folder_that_is_no_toy_world(tmp_path, capsys):
    assert p3_attention("grounding", str(tmp_path), "--checkpoint", str(tmp_path / "none.pt")) \
        == EXIT_USER_ERROR
    assert "is not a built toy world" in capsys.readouterr().err


def test_cli_help_runs_headless_even_with_a_malformed_manifest(tmp_path):
    broken = tmp_path / "repo"  # the CLI and hw3/ beside a malformed checkpoints.json
    shutil.copytree(ROOT / "hw3", broken / "hw3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "p3_attention.py", broken)
    (broken / "checkpoints.json").write_text("{not json")
    for root, manifest_ok in ((ROOT, True), (broken, False)):
        for args in ([], ["grounding"]):
            done = subprocess.run([sys.executable, str(root / "p3_attention.py"), *args, "--help"],
                                  capture_output=True, text=True, cwd=root,
                                  env={**os.environ, "MPLBACKEND": "Agg", "DISPLAY": "", "PYTHONPATH": str(ROOT)})
            assert done.returncode == 0 and "--checkpoint" in done.stdout, done.stderr
            assert ("no default: cannot read manifest" in " ".join(done.stdout.split())) != manifest_ok
            # the decode defaults are DecodeConfig's
            assert f"(1 = greedy) (default: {DecodeConfig().beam_size})" in " ".join(done.stdout.split())


def notebook_code():
    import nbformat
    notebook = nbformat.read(str(ROOT / "p3_visualize.ipynb"), as_version=4)
    nbformat.validate(notebook)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_imports_the_library_and_takes_decode_settings_from_decode_config(monkeypatch):
    """The notebook imports no top-level script (only the course's decoder.py / tokenizer.py); its parameter cell
    decodes with DecodeConfig's defaults, P3_BEAM_SIZE overriding the beam size only when set."""
    code = notebook_code()
    scripts = {path.stem for path in ROOT.glob("*.py")} - {"decoder", "tokenizer"}
    imported = set()
    for source in code:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
    assert "hw3" in imported and not imported & scripts
    monkeypatch.setenv("P3_CHECKPOINT", "best.pt")
    monkeypatch.delenv("P3_BEAM_SIZE", raising=False)
    parameters = {}
    exec(code[0], parameters)
    assert parameters["DECODE"] == DecodeConfig()
    monkeypatch.setenv("P3_BEAM_SIZE", "2")
    exec(code[0], parameters)
    assert parameters["DECODE"] == DecodeConfig(beam_size=2)


@pytest.mark.slow
def test_notebook_runs_headless_and_draws_figures(toy_world_small, toy_checkpoint, tmp_path, monkeypatch):
    import nbclient
    import nbformat
    world = ToyWorld(toy_world_small)
    settings = {"P3_CHECKPOINT": str(toy_checkpoint), "P3_DECODER": str(world.decoder),
                "P3_IMAGES": str(world.p3_images), "P3_OUT_DIR": str(tmp_path / "nb"),
                "P3_LAYER": "0", "P3_BEAM_SIZE": "2"}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(str(ROOT / "p3_visualize.ipynb"), as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    pngs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if "image/png" in output.get("data", {})]
    assert len(pngs) == 5 + 2  # the five p3 images, then the first image at each of the two layers
    assert sorted(p.name for p in (tmp_path / "nb").iterdir()) == [
        "bike.png", "bike_layer0.png", "bike_layer1.png", "girl.png", "sheep.png", "ski.png", "umbrella.png"]
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "showing layer 0, heads averaged" in text


def test_a_words_peak_is_named_by_its_third_of_the_view_and_its_share():
    grid = torch.full((6, 6), 1.0)
    grid[0, 5] = 13.0  # 13 of 48
    assert peak_region(grid) == "top right, 27% of the attention"
    grid = torch.zeros(6, 6)
    grid[2, 3] = 1.0
    assert peak_region(grid) == "centre, 100% of the attention"
    grid = torch.zeros(7, 7)
    grid[6, 0] = 1.0
    assert peak_region(grid) == "bottom left, 100% of the attention"
