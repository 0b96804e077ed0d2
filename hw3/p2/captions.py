"""The one reader of COCO-style caption files, the course's train.json and val.json:

    {"images": [{"file_name": "000123.jpg", "id": 123}, ...],
     "annotations": [{"caption": "A dog on a couch.", "id": 7, "image_id": 123}, ...]}

Training data (data.read_split) and scoring (metrics.load_references) both read them here.
"""
from typing import Dict, Hashable, List, NamedTuple

from hw3.common.errors import UserError
from hw3.common.files import read_json

LAYOUT = '{"images": [{"file_name", "id"}], "annotations": [{"caption", "id", "image_id"}]}'


class CaptionFile(NamedTuple):
    file_names: Dict[Hashable, str]  # image id -> file name, every image in the file's order
    captions: Dict[Hashable, List[str]]  # image id -> its captions in the file's order; the captioned images only


def read_caption_file(path: str) -> CaptionFile:
    """The images and captions of the caption file at `path`. Raises UserError naming the file when it is not JSON
    in that layout, or when an annotation names an image_id that no image has."""
    data = read_json(path, "caption annotation file")
    try:
        file_names = {image["id"]: image["file_name"] for image in data["images"]}
        captions: Dict[Hashable, List[str]] = {}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in file_names:
                raise UserError(f"{path}: annotation {annotation.get('id')} names unknown image_id "
                                f"{annotation['image_id']}")
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    except (KeyError, TypeError) as error:
        raise UserError(f"{path} is not a course caption file ({type(error).__name__}: {error}): expected "
                        f"{LAYOUT}") from None
    return CaptionFile(file_names, captions)
