"""hw3/common/images.py is the one image reader: the training dataset, the validation loader and hw3_2.sh's path
give identical model inputs for the same file, and the reader's choices hold (stored pixels without EXIF rotation,
full-size decoding, 16-bit and CMYK images to 8-bit RGB)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from decoder import GPTConfig
from hw3.common.errors import UserError
from hw3.common.images import ImageFiles, ReadableImageFiles, list_image_files, open_image
from hw3.p2.config import DataPaths, TrainConfig
from hw3.p2.inference import encoded_batches
from hw3.p2.metrics import read_image_like_course
from hw3.p2.model import CaptionConfig, build_caption_model
from hw3.p2.training import Processes, load_data
from tokenizer import BPETokenizer

EXIF_ORIENTATION = 0x0112


def smooth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colourful picture with some noise: JPEG keeps detail at every scale, so draft decoding would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f * xx + g * yy) + p) for f, g, p in rng.uniform(0.5, 6, size=(3, 3))]
    picture = 127.5 + 90 * np.stack(channels, -1) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """The four awkward files: a 640x480 JPEG, a JPEG with an EXIF orientation tag, a CMYK JPEG, a 16-bit PNG."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(smooth_rgb(640, 480, 0)).save(folder / "plain.jpg", quality=92)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(smooth_rgb(320, 200, 1)).save(folder / "rotated.jpg", quality=92, exif=exif)
    Image.fromarray(smooth_rgb(300, 260, 2)).convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    grey16 = (np.linspace(0, 65535, 256 * 192).reshape(192, 256)).astype(np.uint16)
    Image.fromarray(grey16, mode="I;16").save(folder / "deep.png")
    return folder


def test_the_reader_uses_the_stored_pixels_at_full_size(image_files):
    plain = open_image(image_files / "plain.jpg")
    with Image.open(image_files / "plain.jpg") as image:
        full_decode = np.asarray(image.convert("RGB"))
    assert plain.mode == "RGB" and plain.size == (640, 480)
    assert np.array_equal(np.asarray(plain), full_decode)  # no draft decoding at a reduced scale

    rotated = open_image(image_files / "rotated.jpg")
    with Image.open(image_files / "rotated.jpg") as image:
        assert image.getexif()[EXIF_ORIENTATION] == 6
    assert rotated.size == (320, 200)  # as stored: EXIF orientation is not applied
    assert np.array_equal(np.asarray(rotated), np.asarray(read_image_like_course(str(image_files / "rotated.jpg"))))

    cmyk = open_image(image_files / "cmyk.jpg")
    with Image.open(image_files / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
    assert cmyk.mode == "RGB" and cmyk.size == (300, 260)

    deep = np.asarray(open_image(image_files / "deep.png"))
    assert deep.shape == (192, 256, 3) and deep.dtype == np.uint8
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 200  # scaled, not clipped at 255
    assert np.array_equal(deep[..., 0], deep[..., 2])


def test_unreadable_files_are_named_or_reported(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    transform = lambda image: torch.from_numpy(np.asarray(image).copy())  # noqa: E731
    with pytest.raises(UserError, match="broken.jpg"):
        ImageFiles([tmp_path / "broken.jpg"], transform)[0]
    zeros, index, message = ReadableImageFiles([tmp_path / "broken.jpg"], transform, size=8)[0]
    assert zeros.shape == (3, 8, 8) and not zeros.any() and index == 0 and "UnidentifiedImageError" in message
    with pytest.raises(UserError, match="image folder not found"):
        list_image_files(tmp_path / "nowhere")


def test_training_validation_and_hw3_2_give_identical_model_inputs(image_files, toy_world_small, tmp_path):
    names = sorted(path.name for path in image_files.iterdir())
    data_dir = tmp_path / "p2_data"
    for split in ("train", "val"):
        (data_dir / "images" / split).mkdir(parents=True)
        for name in names:
            (data_dir / "images" / split / name).write_bytes((image_files / name).read_bytes())
        annotations = {"images": [{"file_name": name, "id": i} for i, name in enumerate(names)],
                       "annotations": [{"caption": "a picture", "id": i, "image_id": i} for i in range(len(names))]}
        (data_dir / f"{split}.json").write_text(json.dumps(annotations))
    model_config = CaptionConfig(encoder=str(toy_world_small / "clip.pt"), peft=[],
                                 decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128), context_width=64,
                                 cross_attn_width=64, cross_attn_heads=2)
    model = build_caption_model(model_config, str(toy_world_small / "decoder_model.bin")).eval()
    paths = DataPaths.of_course_data(str(data_dir), str(toy_world_small / "decoder_model.bin"),
                                     str(toy_world_small / "clip.pt"), str(toy_world_small / "clip.pt"))
    config = TrainConfig(model=model_config, num_workers=0, val_batch_size=len(names))
    data = load_data(config, paths, model.encoder, BPETokenizer(), Processes(0, 1, torch.device("cpu")))

    train_inputs = torch.stack([data.train[i][0] for i in range(len(names))])  # the training dataset's items
    val_inputs = next(iter(data.val_loader))  # the validation loader's batch
    assert data.val_keys == [name.rsplit(".", 1)[0] for name in names]
    assert torch.equal(train_inputs, val_inputs)
    assert train_inputs.shape == (len(names), 3, model.encoder.image_size, model.encoder.image_size)
    assert not torch.equal(train_inputs[0], train_inputs[1])

    # hw3_2.sh's path (p2_inference.py -> hw3.p2.inference.encoded_batches): the encoder tokens it decodes from
    files = list_image_files(data_dir / "images" / "val")
    (batch_names, tokens, errors), = list(encoded_batches(model, files, batch_size=len(files), num_workers=0))
    assert batch_names == names and not errors
    with torch.no_grad():
        assert torch.equal(tokens, model.encode_images(train_inputs))
