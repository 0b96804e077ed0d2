"""The course's data layout, in one place: every tool that reads hw3_data (or a folder shaped like it) asks here.

    hw3_data/
      p1_data/val/{class_id}_{image_id}.png, p1_data/id2label.json
      p2_data/images/{train,val}/*.jpg, p2_data/{train,val}.json, p2_data/decoder_model.bin
      p3_data/images/*.jpg
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


@dataclass(frozen=True)
class CourseLayout:
    """An hw3_data folder. `p2_root` names p2_data when it lies elsewhere (a training config's `data_dir`)."""
    root: Path
    p2_root: Path = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())
        object.__setattr__(self, "p2_root", Path(self.p2_root).expanduser() if self.p2_root else self.root / "p2_data")

    @classmethod
    def of_p2_data(cls, p2_data: PathLike) -> "CourseLayout":
        """The layout around a p2_data folder (what P2 training reads: its annotations, images and decoder)."""
        p2_data = Path(p2_data).expanduser()
        return cls(p2_data.parent, p2_data)

    @property
    def p1_val(self) -> Path:
        return self.root / "p1_data" / "val"

    @property
    def id2label(self) -> Path:
        return self.root / "p1_data" / "id2label.json"

    @property
    def p2_data(self) -> Path:
        return self.p2_root

    def p2_annotations(self, split: str) -> Path:  # split: "train" or "val"
        return self.p2_root / f"{split}.json"

    def p2_images(self, split: str) -> Path:
        return self.p2_root / "images" / split

    @property
    def decoder(self) -> Path:  # the course's GPT-2 (decoder_model.bin)
        return self.p2_root / "decoder_model.bin"

    @property
    def p3_images(self) -> Path:
        return self.root / "p3_data" / "images"
