"""Caption training data in the course layout: annotations, tokenised captions, images (or their cached encoder
tokens), and batches with the course's input/target shift (tokenizer.make_caption_batch).

    split = read_split("p2_data/train.json", "p2_data/images/train")
    images = ImageFiles(split.paths, encoder.preprocess)                          # preprocessed images, or
    images = feature_cache(encoder, split.paths, "feature_cache", device)         # frozen tokens, fp16 memmap
    data = CaptionDataset(images, tokenize_captions(split, BPETokenizer(), 60), per_image=True)
    loader = DataLoader(data, batch_size=32, collate_fn=collate_captions)       # -> CaptionBatch

Because the encoder is frozen, its tokens for an image never change: `feature_cache` computes them once,
stores them as float16 in a .npy file next to a JSON record, and reads them back memory-mapped, so later runs
with the same encoder and images skip the encoder entirely. The cache proves itself before it is used: the record
holds what it was built from (encoder, layer, input size, each image's size and mtime) and the array's expected
shape and byte length, and the file's length must match its .npy header. Anything else (a cut-off file, images
replaced under the same names, a record missing after a kill) rebuilds it in place, with a line saying why.
"""
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import IO, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hw3.common.encoder_names import parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.files import CACHE_VARIABLE, cache_root, image_key, write_json_atomically
from hw3.common.images import ImageFiles
from hw3.p2.captions import read_caption_file
from hw3.p2.encoder import ImageEncoder
from tokenizer import BPETokenizer, make_caption_batch


@dataclass
class CaptionSplit:
    """The images of one split (annotation order) and the reference captions of each."""
    images_root: str
    file_names: List[str]
    captions: List[List[str]]

    @property
    def keys(self) -> List[str]:  # prediction keys: file names without extension
        return [image_key(name) for name in self.file_names]

    @property
    def paths(self) -> List[str]:
        return [os.path.join(self.images_root, name) for name in self.file_names]


def read_split(annotation_file: str, images_root: str) -> CaptionSplit:
    """The split of a course caption file (captions.read_caption_file) whose images are in `images_root`. Keeps the
    images with at least one caption, as the course's scorer does; raises UserError when there are none, or when
    some are not in `images_root`."""
    file_names, captions = read_caption_file(annotation_file)
    ids = [image_id for image_id in file_names if image_id in captions]
    if not ids:
        raise UserError(f"{annotation_file} has no captioned images")
    missing = [file_names[i] for i in ids if not os.path.isfile(os.path.join(images_root, file_names[i]))]
    if missing:
        raise UserError(f"{len(missing)} images of {annotation_file} are not in {images_root}, e.g. {missing[:3]}")
    return CaptionSplit(images_root, [file_names[i] for i in ids], [captions[i] for i in ids])


def tokenize_captions(split: CaptionSplit, tokenizer: BPETokenizer, max_len: int) -> List[List[List[int]]]:
    """Token ids of every caption of every image, cut to max_len tokens (the end token comes on top)."""
    return [[tokenizer.encode(caption.strip())[:max_len] for caption in captions]
            for captions in tqdm(split.captions, desc="tokenizing captions", leave=False)]


# ---- the feature cache ------------------------------------------------------------------------------------------

FEATURES_DTYPE = np.dtype(np.float16)
_LEFTOVER = re.compile(r"^(features-[0-9a-f]{16})\.(?:npy\.\d+\.partial|json\.\d+\.tmp)$")  # of a build that died


class FeatureCache(Dataset):
    """Cached encoder tokens: item i -> float16 tensor [N, D] of image i, read from a memory-mapped .npy file."""

    def __init__(self, path: str):
        self.path = path
        self.features = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[index]))


def resolve_cache_dir(cache_dir: str) -> str:
    """The folder `cache_dir` names: a leading `$HW3_CACHE` stands for hw3.common.files.cache_root() (the variable's
    value, else ~/.cache/dlcv-hw3), read at each call, so the variable set after import still counts; `~` is the
    home folder."""
    for variable in (f"${CACHE_VARIABLE}", f"${{{CACHE_VARIABLE}}}"):
        if cache_dir == variable or cache_dir.startswith(variable + "/"):
            cache_dir = str(cache_root()) + cache_dir[len(variable):]
    return os.path.expanduser(cache_dir)


def _encoder_fingerprint(name: str) -> str:
    """An encoder's name, plus its weights file's size and modification time when it names a local file (a CLIP
    state_dict path, or timm:NAME@FILE; the file the loader reads, as hw3.common.encoder_names parses it): other
    weights under the same name give another key. The file is spelled as an absolute path in the name."""
    encoder = parse_encoder_name(name)
    if encoder.file and os.path.isfile(encoder.file):
        stat = os.stat(encoder.file)
        spelled = dataclasses.replace(encoder, file=os.path.abspath(encoder.file)).text
        return f"{spelled}:{stat.st_size}:{stat.st_mtime_ns}"
    return name


def feature_cache_description(encoder_name: str, layer: int, image_size: int, paths: Sequence[str]) -> dict:
    """What a feature cache file holds, the key of its name: the encoder (_encoder_fingerprint), the layer its
    tokens come from, its input size and the images' absolute paths, in order."""
    return {"encoder": _encoder_fingerprint(encoder_name), "layer": layer, "image_size": image_size,
            "paths": [os.path.abspath(p) for p in paths]}


def feature_cache_path(cache_dir: str, encoder_name: str, layer: int, image_size: int, paths: Sequence[str]) -> str:
    """The .npy file `feature_cache` keeps these images' tokens in: features-<16 hex digits of the sha256 of
    feature_cache_description>.npy in `cache_dir` (resolved by the caller: see resolve_cache_dir), its record beside
    it as .json (feature_cache_record). It exists only once whole."""
    description = feature_cache_description(encoder_name, layer, image_size, paths)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"features-{digest}.npy")


def image_stamps(paths: Sequence[str]) -> List[List[int]]:
    """[size in bytes, modification time in ns] of each image: how a cache notices images replaced under the same
    names. Not a content hash: hashing the 12k course JPEGs (about 2 GB) at every run costs seconds to a minute, a
    stat of each costs milliseconds, and copying, saving or extracting a file over another sets a new mtime. The
    blind spot: a file replaced by one of the same size with its old mtime restored (`cp -p`, `rsync -t`,
    `touch -d`, an archive that keeps times) or rewritten within the file system's timestamp granularity at the same
    size; delete the cache file to rebuild it then."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise UserError(f"cannot read image {path}: {error.strerror}") from None
        stamps.append([stat.st_size, stat.st_mtime_ns])
    return stamps


def _npy_header(shape: Sequence[int]) -> bytes:
    """The .npy header of a C-order float16 array of `shape`, as np.save writes it (format 1.0, 64-byte aligned)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(FEATURES_DTYPE),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue()


def feature_cache_record(encoder: ImageEncoder, paths: Sequence[str]) -> dict:
    """What the cache of the encoder's tokens of `paths` must be, kept as JSON beside it: feature_cache_description,
    each image's image_stamps (taken before any image is read, so an image replaced during a build makes the next
    run rebuild), and the array's shape, dtype and byte length (the .npy header included)."""
    shape = [len(paths), encoder.n_tokens, encoder.width]
    length = len(_npy_header(shape)) + int(np.prod(shape)) * FEATURES_DTYPE.itemsize
    return dict(feature_cache_description(encoder.name, encoder.layer, encoder.image_size, paths),
                images=image_stamps(paths), shape=shape, dtype=FEATURES_DTYPE.name, bytes=length)


def _record_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def _npy_problem(path: str, record: dict) -> Optional[str]:
    """Why the .npy file at `path` is not a whole array of record's shape and dtype, None when it is: its header
    must read, and the file's length must be the header's plus what the header's shape and dtype take."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"its .npy format {version} is not one this code writes"
            shape, fortran_order, dtype = read_header(file)
            expected = file.tell() + int(np.prod(shape)) * dtype.itemsize
            size = os.fstat(file.fileno()).st_size
    except ValueError as error:  # numpy's answer to a cut-off or garbled header
        return f"its .npy header does not read ({error})"
    except OSError as error:
        return f"it cannot be read ({error.strerror})"
    if size != expected:
        return f"the file is {size} bytes, its header says {expected} ({'cut off' if size < expected else 'overlong'})"
    if list(shape) != record["shape"] or dtype != FEATURES_DTYPE or fortran_order:
        return f"it holds {dtype} {list(shape)}, not {FEATURES_DTYPE} {record['shape']}"
    return None


def feature_cache_problem(path: str, record: dict) -> Optional[str]:
    """Why the cache file `path` cannot serve `record` (feature_cache_record), in a few words; None when it can. It
    must be a whole .npy array of the record's shape (_npy_problem), and the JSON beside it must be the record:
    same key, shape and length, and every image's size and mtime as now."""
    if not os.path.exists(path):
        return "it does not exist"
    problem = _npy_problem(path, record)
    if problem:
        return problem
    try:
        with open(_record_path(path), encoding="utf-8") as file:
            built = json.load(file)
    except (OSError, ValueError):
        built = None
    if not isinstance(built, dict) or not isinstance(built.get("images", []), list):
        return f"its record {os.path.basename(_record_path(path))} is missing or unreadable"
    if "images" not in built:
        return "its record has no image sizes and times (an older cache)"
    differing = [key for key in record if key != "images" and built.get(key) != record[key]]
    if differing or len(built["images"]) != len(record["images"]):
        return f"it was built with another {', '.join(differing or ['image count'])}"
    changed = [path for path, then, now in zip(record["paths"], built["images"], record["images"]) if then != now]
    if changed:
        return (f"{len(changed)} image{'s' if len(changed) > 1 else ''} changed since it was built (e.g. "
                f"{os.path.basename(changed[0])})")
    return None


@contextlib.contextmanager
def _lock_file(path: str) -> Iterator[Tuple[Optional[IO], str]]:
    """(the open `<path>.lock`, ""), closed (and so unlocked) on leaving; (None, the reason) when the folder cannot
    be written (read-only, no permission): a valid cache there is still read, nothing is built."""
    try:
        lock = open(f"{path}.lock", "a")
    except OSError as error:
        yield None, error.strerror or str(error)
        return
    with lock:
        yield lock, ""


def _remove_files(cache_dir: str, stem: str) -> List[int]:
    """Removes the leftovers (_LEFTOVER) of `stem`'s builds; returns their sizes."""
    sizes = []
    for name in os.listdir(cache_dir):
        match = _LEFTOVER.match(name)
        if match and match.group(1) == stem:
            file = os.path.join(cache_dir, name)
            try:
                size = os.path.getsize(file)
                os.remove(file)
                sizes.append(size)
            except FileNotFoundError:  # removed meanwhile by another build that held the lock before
                pass
    return sizes


def remove_leftovers(cache_dir: str, own: str) -> None:
    """Removes the partial files of builds that died (SIGKILL, a power cut, a crash of the encoder) in `cache_dir`,
    with a line saying how much. The caller holds the lock of cache `own`. A builder holds its cache's lock from
    before it creates its partial file until that file is renamed or removed, and the lock dies with its process:
    so `own`'s partials belong to no live build, and another cache's do not either once its lock is taken (without
    waiting: a lock that is held means a build of it is running, its partial is left alone). PIDs in the names are
    not trusted: they are reused, and a cache folder on a shared disk sees other machines' builds."""
    stems = sorted({match.group(1) for match in map(_LEFTOVER.match, os.listdir(cache_dir)) if match})
    sizes = []
    for stem in stems:
        target = os.path.join(cache_dir, f"{stem}.npy")
        if target == own:
            sizes += _remove_files(cache_dir, stem)
            continue
        with _lock_file(target) as (lock, _):
            try:
                if lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    sizes += _remove_files(cache_dir, stem)
            except OSError:  # held: that build is alive
                pass
    if sizes:
        print(f"feature cache: removed {len(sizes)} leftover file{'s' if len(sizes) > 1 else ''} of interrupted "
              f"builds from {cache_dir} ({_size_text(sum(sizes))})", flush=True)


def _size_text(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size:.0f} bytes"


def _check_free_space(folder: str, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"the feature cache needs {_size_text(needed)} in {folder}, {_size_text(free)} are free: "
                        f"free disk space, or point cache_dir (or ${CACHE_VARIABLE}) to a larger disk")


def _preallocate(file: IO, size: int) -> None:
    """Reserves the file's blocks now, so a disk that fills later fails here, before any encoding, instead of in the
    middle. Where the file system cannot (os.posix_fallocate missing or unsupported) the ordinary writes that follow
    still report a full disk as an OSError (ENOSPC); only writes through an mmap of a sparse file meet it as
    SIGBUS."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _write_features(encoder: ImageEncoder, paths: Sequence[str], file: IO, shape: Sequence[int], device,
                    batch_size: int, num_workers: int) -> None:
    """The .npy file of the encoder's fp16 tokens of `paths`, written to `file` in batches by ordinary writes."""
    file.write(_npy_header(shape))
    loader = DataLoader(ImageFiles(paths, encoder.preprocess), batch_size=batch_size, num_workers=num_workers)
    written = 0
    for images in tqdm(loader, desc=f"caching encoder tokens {list(shape)}", leave=False):
        tokens = encoder(images.to(device)).half().cpu().numpy()
        if tokens.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"encoder {encoder.name} gave tokens {tokens.shape[1:]}, its metadata says {shape[1:]}")
        file.write(np.ascontiguousarray(tokens).data)
        written += len(tokens)
    if written != shape[0]:
        raise ValueError(f"{written} images encoded of {shape[0]}")
    file.flush()
    os.fsync(file.fileno())  # a write error that the page cache held back (a full disk, NFS) shows before the rename


def _build(encoder: ImageEncoder, paths: Sequence[str], path: str, record: dict, device, batch_size: int,
           num_workers: int) -> None:
    """Writes the cache file `path` and its record, under its lock. The stale array goes first, then the record is
    written, then the array to `<path>.<pid>.partial`, renamed into place once whole: a record is only ever beside
    the array its own build renamed there, and every byte is on the disk (the record's, the array's reserved by
    _preallocate) before any encoding. A failure removes the partial file; a full disk or another write error is
    one UserError naming the folder."""
    folder = os.path.dirname(path)
    if os.path.exists(path):
        os.remove(path)
    _check_free_space(folder, record["bytes"] + len(json.dumps(record)))
    partial = f"{path}.{os.getpid()}.partial"
    try:
        write_json_atomically(_record_path(path), record)
        with open(partial, "wb") as file:
            _preallocate(file, record["bytes"])
            _write_features(encoder, paths, file, record["shape"], device, batch_size, num_workers)
        os.replace(partial, path)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            reason += f" (the feature cache needs {_size_text(record['bytes'])})"
        raise UserError(f"cannot write the feature cache in {folder}: {reason}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def feature_cache(encoder: ImageEncoder, paths: Sequence[str], cache_dir: str, device="cpu", batch_size: int = 64,
                  num_workers: int = 0) -> FeatureCache:
    """The encoder's tokens of `paths` (unaugmented), from `cache_dir` (resolve_cache_dir) if computed before and
    still valid (feature_cache_problem), else computed now (fp16) and stored there, in the file feature_cache_path
    names. A cache that exists but is invalid (cut off, images changed since) is rebuilt, with a line saying why;
    leftovers of dead builds are removed (remove_leftovers); the free space is checked before any encoding. A cache
    that cannot be (re)built (a read-only folder, a full disk) is a UserError naming the file or folder."""
    cache_dir = resolve_cache_dir(cache_dir)
    path = feature_cache_path(cache_dir, encoder.name, encoder.layer, encoder.image_size, paths)
    record = feature_cache_record(encoder, paths)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the feature cache folder {cache_dir}: {error.strerror}") from None
    with _lock_file(path) as (lock, unwritable):
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once with the same images: one computes, the other waits
        problem = feature_cache_problem(path, record)
        if problem is None:
            return FeatureCache(path)
        if unwritable:
            raise UserError(f"feature cache {path}: {problem}, and it cannot be built there ({unwritable})")
        remove_leftovers(cache_dir, path)
        if os.path.exists(path):
            print(f"feature cache {path}: {problem}; rebuilding", flush=True)
        _build(encoder, paths, path, record, device, batch_size, num_workers)
    return FeatureCache(path)


# ---- captions ---------------------------------------------------------------------------------------------------

class CaptionBatch(NamedTuple):
    images: torch.Tensor      # [B, 3, S, S] preprocessed images, or [B, N, D] cached encoder tokens
    input_ids: torch.Tensor   # [B, K]: 50256, t1..tN, 50256, pad 50256 ...
    targets: torch.Tensor     # [B, K]: t1..tN, 50256, -100 ...
    image_index: torch.Tensor  # [B] index of each image in its split

    def to(self, device: torch.device) -> "CaptionBatch":
        return CaptionBatch(*(t.to(device, non_blocking=True) for t in self))


class CaptionDataset(Dataset):
    """(image, caption) pairs. per_image=False: every caption is an item (an epoch sees each caption once);
    per_image=True: every image is an item, with one of its captions drawn at random per epoch (`set_epoch`), which
    makes epochs shorter by the number of captions per image."""

    def __init__(self, images: Dataset, captions: List[List[List[int]]], per_image: bool = False, seed: int = 0):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but captions for {len(captions)}")
        self.images, self.captions, self.per_image, self.seed, self.epoch = images, captions, per_image, seed, 0
        self.pairs = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions) if self.per_image else len(self.pairs)

    def __getitem__(self, index: int):
        if self.per_image:
            image = index
            caption = random.Random(f"{self.seed}-{self.epoch}-{index}").randrange(len(self.captions[index]))
        else:
            image, caption = self.pairs[index]
        return self.images[image], self.captions[image][caption], image


def collate_captions(items) -> CaptionBatch:
    images, tokens, index = zip(*items)
    input_ids, targets = make_caption_batch(tokens)
    return CaptionBatch(torch.stack(images), input_ids, targets, torch.tensor(index))


def caption_vocabulary(captions: List[List[List[int]]], extra: Sequence[int] = ()) -> torch.Tensor:
    """Sorted ids of every token in the captions, plus `extra` (e.g. the end token)."""
    return torch.tensor(sorted({t for caps in captions for tokens in caps for t in tokens} | set(extra)))


def image_batches(images: Dataset, batch_size: int, num_workers: int = 0, limit: Optional[int] = None) -> DataLoader:
    """Images (or cached tokens) in order, the first `limit` only when given: for validation."""
    if limit:
        images = torch.utils.data.Subset(images, range(min(limit, len(images))))
    return DataLoader(images, batch_size=batch_size, num_workers=num_workers)
