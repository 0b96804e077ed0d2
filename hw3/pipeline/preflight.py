"""Checks before a run: what `bash demo.sh --check` and `python3 preflight.py DATA_DIR` print, and what a full run
checks first (it stops when one fails).

Each finding is ok, WARN (it only slows the run, or may move its numbers) or FAIL (the run cannot succeed), and says
what to do. In order: Python and the packages against the grader's pins (requirements.txt), Java (the CIDEr
scorer's PTB tokenizer), the GPU; the data (layout, image counts, annotation files parse, every annotated image
exists); the P2 configs; every pretrained model (a CLIP or timm name cached, or the download it would need; a file
exists and loads); decoder_model.bin with its load report; free disk for the frozen encoder's feature cache.

Image counts: the course data must have the course's (P1 val 2500, P2 10604 train / 1789 val, 5 P3 images); a toy
world must have those its boxes.json lists.
"""
import functools
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import clip
import torch

from hw3.common.clip_models import load_clip
from hw3.common.download import OK as DOWNLOAD_OK
from hw3.common.download import (cached_timm_weights, encoder_backbone, preload_backbone,
                                  timm_weights_source)
from hw3.common.encoder_names import EncoderName, parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.files import REPO_ROOT, read_json
from hw3.common.images import list_image_files
from hw3.p2.config import TrainConfig, load_config
from hw3.p2.data import CaptionSplit, feature_cache_path, read_split, resolve_cache_dir
from hw3.p2.encoder import encoder_token_shape, load_image_encoder
from hw3.p2.model import load_decoder_with_report
from hw3.pipeline.inputs import RunInputs

OK, WARN, FAIL = "ok", "WARN", "FAIL"
COURSE_COUNTS = {"p1 val": 2500, "p2 train": 10604, "p2 val": 1789, "p3": 5}
TOY_SPLITS = {"p1 val": "p1_val", "p2 train": "p2_train", "p2 val": "p2_val", "p3": "p3"}  # boxes.json's names
SCORER_PACKAGES = ("pycocoevalcap",)  # beyond requirements.txt: the CIDEr scorer's PTB tokenizer
CLIP_CACHE = Path("~/.cache/clip").expanduser()  # clip.load's download_root
GB = 1e9


def size_text(size: float) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 1e6:.1f} MB"


@dataclass
class Finding:
    level: str  # OK, WARN or FAIL
    subject: str
    text: str
    todo: str = ""  # what to do about it

    def __str__(self) -> str:
        return f"  {self.level:<4}  {self.subject}: {self.text}" + (f"\n          -> {self.todo}" if self.todo else "")


# ---- environment ----------------------------------------------------------------------------------------------------

def pinned_packages() -> List[Tuple[str, Optional[str]]]:
    """(distribution, pinned version or None) of requirements.txt, plus the scorer's packages of
    requirements-dev.txt."""
    packages = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO_ROOT / name).read_text().splitlines():
            requirement = line.split("#", 1)[0].strip()
            distribution, _, version = requirement.partition("==")
            if requirement and (name == "requirements.txt" or distribution in SCORER_PACKAGES):
                packages.append((distribution, version or None))
    return packages


def check_environment(course_data: bool) -> List[Finding]:
    findings = []
    version = ".".join(map(str, sys.version_info[:3]))
    findings.append(Finding(OK, "python", version) if sys.version_info[:2] == (3, 8) else
                    Finding(WARN, "python", f"{version}, the grader runs 3.8", "bash setup.sh builds .venv with 3.8"))
    matching = []
    for distribution, pin in pinned_packages():
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            findings.append(Finding(FAIL, "packages", f"{distribution} is not installed", "bash setup.sh"))
            continue
        if pin and installed.split("+")[0] != pin:
            findings.append(Finding(WARN, "packages", f"{distribution} {installed}, the grader pins {pin} (numbers "
                                                      "may move)", "bash setup.sh installs the pins into .venv"))
        else:
            matching.append(f"{distribution} {installed}")
    findings.append(Finding(OK, "packages", ", ".join(matching)))
    return findings + [check_java(), check_gpu(course_data)] + check_gpu_build()


def check_java() -> Finding:
    if shutil.which("java") is None:
        return Finding(FAIL, "java", "not on PATH; CIDEr's PTB tokenizer (validation, p2_evaluate.py) is Java",
                       "install a Java runtime, e.g. apt-get install default-jre-headless")
    result = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return Finding(FAIL, "java", f"`java -version` fails: {result.stderr.strip()[:200]}",
                       "repair or reinstall the Java runtime")
    return Finding(OK, "java", (result.stderr or result.stdout).splitlines()[0])


def check_gpu(course_data: bool) -> Finding:
    if not torch.cuda.is_available():
        if not course_data:
            return Finding(OK, "gpu", "none (the toy world runs on the CPU)")
        return Finding(WARN, "gpu", "none: the course data on the CPU takes days (ViT-L/14 encodes about 0.4 images/s)",
                       "run on a machine with a CUDA GPU (the grader's: an 11 GB RTX 2080 Ti)")
    devices = [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]
    return Finding(OK, "gpu", "; ".join(f"{d.name}, {d.total_memory / 2**30:.1f} GiB" for d in devices))


TORCH_WHEELS = "https://download.pytorch.org/whl"  # PyTorch's own index: the CUDA 11.x builds of torch 1.12.1


def parse_arch(entry: str) -> Optional[Tuple[str, Tuple[int, int]]]:
    """An entry of torch.cuda.get_arch_list(): 'sm_86' -> ('sm', (8, 6)) (kernels compiled for that GPU kind),
    'compute_86' -> ('compute', (8, 6)) (PTX, compiled by the driver for that kind or any newer one), 'sm_90a' ->
    ('sm', (9, 0)); None for anything else."""
    kind, _, number = entry.partition("_")
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
    if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
        return None
    return kind, (int(digits[:-1]), int(digits[-1]))


def torch_build_advice(capability: Tuple[int, int], pip: str = "pip") -> str:
    """Which torch 1.12.1 build runs on a GPU of this compute capability, and the command that installs it. The
    PyPI wheel is CUDA 10.2 (sm_37, sm_50, sm_60, sm_70); PyTorch's CUDA 11.3 and 11.6 builds add sm_75, sm_80, sm_86;
    no 1.12.1 build has sm_9x or newer kernels."""
    sm = "sm_%d%d" % capability
    if capability < (3, 7):
        return f"no torch 1.12.1 build runs on {sm} (its oldest kernels are sm_37): use a newer GPU"
    if capability >= (9, 0):
        return (f"no torch 1.12.1 build has {sm} kernels (its newest are sm_86): train with a newer torch built for "
                "this GPU (a CUDA 11.8 or 12.x build of torch 2.x; not tested with this code) or on another GPU; the "
                "graded scripts run on the grader's 2080 Ti with torch 1.12.1 either way")
    return (f"install torch 1.12.1's CUDA 11.3 build (kernels sm_37 to sm_86): {pip} install torch==1.12.1+cu113 "
            f"torchvision==0.13.1+cu113 --extra-index-url {TORCH_WHEELS}/cu113 (or its CUDA 11.6 build: +cu116 and "
            f"{TORCH_WHEELS}/cu116)")


def gpu_build_finding(capability: Tuple[int, int], arch_list: Sequence[str], device: str = "the GPU",
                      build: str = "torch", pip: str = "pip") -> Finding:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of compute capability
    `capability` (torch.cuda.get_device_capability()). Kernels for sm_XY run on GPUs of the same major version X
    and a minor version >= Y (a 2080 Ti, sm_75, runs sm_70 kernels; an RTX 4090, sm_89, runs sm_86 ones); PTX for
    compute_XY is compiled by the driver at start-up for any GPU from XY on (a WARN: slow first start, untested)."""
    sm = "sm_%d%d" % capability
    what = f"{device} ({sm})"
    if not arch_list:
        return Finding(WARN, "gpu build", f"{what}: {build} does not list the GPU kinds it was built for; not checked")
    parsed = [arch for arch in map(parse_arch, arch_list) if arch is not None]
    kernels = sorted(arch for kind, arch in parsed if kind == "sm" and arch[0] == capability[0]
                     and arch[1] <= capability[1])
    if kernels:
        best = "sm_%d%d" % kernels[-1]
        via = "" if best == sm else f" (its {best} kernels run on {sm})"
        return Finding(OK, "gpu build", f"{what}: {build} has kernels for it{via}")
    ptx = sorted(arch for kind, arch in parsed if kind == "compute" and arch <= capability)
    if ptx:
        return Finding(WARN, "gpu build", f"{what}: {build} has no kernels for it, only PTX (compute_%d%d) that the "
                                          "driver compiles at start-up: slow, and untested here" % ptx[-1],
                       torch_build_advice(capability, pip))
    return Finding(FAIL, "gpu build", f"{what}: {build} has no kernels for it (it has {' '.join(arch_list)}); every "
                                      "CUDA call would fail with 'no kernel image is available'",
                   torch_build_advice(capability, pip))


def check_gpu_build() -> List[Finding]:
    """gpu_build_finding for each kind of CUDA GPU the installed torch sees; nothing without one."""
    if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        return []
    python = sys.executable
    if python.startswith(str(REPO_ROOT) + os.sep):  # the .venv: not resolved (its python is a symlink)
        python = os.path.relpath(python, REPO_ROOT)
    build = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    findings: Dict[Tuple[str, Tuple[int, int]], Finding] = {}
    for index in range(torch.cuda.device_count()):
        name, capability = torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))
        if (name, capability) not in findings:
            findings[name, capability] = gpu_build_finding(capability, torch.cuda.get_arch_list(), name, build,
                                                           f"{python} -m pip")
    return list(findings.values())


# ---- data -----------------------------------------------------------------------------------------------------------

def expected_counts(inputs: RunInputs) -> Tuple[Dict[str, int], str]:
    """The image counts the data must have, and whose they are."""
    world = inputs.toy_world()
    if world is None:
        return COURSE_COUNTS, "the course data has"
    splits = read_json(world.boxes, "toy world boxes.json")["splits"]
    return {name: len(splits[split]) for name, split in TOY_SPLITS.items()}, "its toy world's boxes.json lists"


def count_finding(name: str, folder: Path, count: int, counts: Dict[str, int], whose: str) -> Finding:
    if count != counts[name]:
        return Finding(FAIL, "data", f"{name}: {count} images in {folder}, {whose} {counts[name]}",
                       "extract the data again (an interrupted copy or unzip?)")
    return Finding(OK, "data", f"{name}: {count} images ({whose} {counts[name]})")


def check_p1(inputs: RunInputs, counts: Dict[str, int], whose: str) -> List[Finding]:
    data = inputs.layout
    if not data.p1_val.is_dir():
        return [Finding(FAIL, "data", f"no P1 val folder {data.p1_val}",
                        f"put the course's hw3_data (p1_data, p2_data, p3_data) in {inputs.data}")]
    images = list_image_files(data.p1_val)
    findings = [count_finding("p1 val", data.p1_val, len(images), counts, whose)]
    try:
        id2label = read_json(data.id2label, "P1 id2label.json")
    except UserError as error:
        return findings + [Finding(FAIL, "data", str(error), "copy p1_data/id2label.json from the course data")]
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        return findings + [Finding(FAIL, "data", f"{data.id2label} is not a mapping class id -> class name",
                                   "copy p1_data/id2label.json from the course data")]
    unlabelled = [path.name for path in images if path.name.split("_", 1)[0] not in id2label]
    if unlabelled:
        findings.append(Finding(FAIL, "data", f"{len(unlabelled)} P1 val images are not named {{class id}}_... with "
                                              f"a class of id2label.json, e.g. {unlabelled[:3]}",
                                "the report's accuracy reads the labels from the names: use the course's val set"))
    else:
        findings.append(Finding(OK, "data", f"id2label.json: {len(id2label)} classes; every P1 val image is "
                                            "labelled by its name"))
    return findings


def check_p2(inputs: RunInputs, counts: Dict[str, int], whose: str) -> Tuple[List[Finding], List[CaptionSplit]]:
    """Findings, and the splits that parse (for the feature cache's size)."""
    findings, splits = [], []
    for split in ("train", "val"):
        annotations, folder = inputs.layout.p2_annotations(split), inputs.layout.p2_images(split)
        try:
            parsed = read_split(str(annotations), str(folder))
        except UserError as error:
            todo = f"extract p2_data again ({split}.json and images/{split}/ must match)"
            findings.append(Finding(FAIL, "data", str(error), todo))
            continue
        splits.append(parsed)
        files = len(list_image_files(folder))
        finding = count_finding(f"p2 {split}", folder, len(parsed.paths), counts, whose)
        if finding.level == OK:
            finding.text += f"; {sum(map(len, parsed.captions))} captions, every annotated image is there"
        if files != len(parsed.paths):
            finding.text += f" ({files - len(parsed.paths)} more image files without captions are not used)"
        findings.append(finding)
    return findings, splits


def check_p3(inputs: RunInputs, counts: Dict[str, int], whose: str) -> Finding:
    folder = inputs.layout.p3_images
    if not folder.is_dir():
        return Finding(FAIL, "data", f"no P3 image folder {folder}", "copy p3_data/images from the course data")
    return count_finding("p3", folder, len(list_image_files(folder)), counts, whose)


# ---- configs and models ---------------------------------------------------------------------------------------------

def check_configs(inputs: RunInputs) -> Tuple[List[Finding], List[TrainConfig]]:
    """Each config (the candidates' too, when asked for) read with the run's overrides, as p2_train.py will read
    it."""
    findings, configs = [], []
    for name in inputs.configs + inputs.candidates:
        try:
            config = load_config(str(REPO_ROOT / name), inputs.train_overrides())
        except UserError as error:
            findings.append(Finding(FAIL, "configs", str(error), f"fix {name}"))
            continue
        if config.model.encoder == "toy":
            findings.append(Finding(FAIL, "configs", f"{name} is a toy config and no encoder is given",
                                    "give --encoder (the toy world's clip.pt)"))
            continue
        configs.append(config)
        findings.append(Finding(OK, "configs", f"{name}: {'+'.join(config.model.peft)}, encoder {config.model.encoder},"
                                               f" {config.epochs} epochs, feature cache "
                                               f"{'on' if config.cache_features else 'off'}"))
    if inputs.scst_config:
        found = (REPO_ROOT / inputs.scst_config).is_file()
        findings.append(Finding(OK, "configs", f"SCST stage: {inputs.scst_config} on the best run") if found else
                        Finding(WARN, "configs", f"SCST stage: {inputs.scst_config} does not exist; the stage "
                                                 "will be skipped", "give --scst-config FILE, or --no-scst"))
    return findings, configs


def network_reaches(url: str) -> bool:
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=5).close()
        return True
    except OSError:
        return False


def download_finding(role: str, name: str, url: str, cache: Path) -> Finding:
    if network_reaches(url):
        return Finding(WARN, "models", f"{role} {name}: not cached in {cache}; it will be downloaded on first use",
                       "`bash demo.sh --fetch` (with your --data, --configs and --candidates) fetches every model "
                       "the run needs now, so training needs no network")
    return Finding(FAIL, "models", f"{role} {name}: not cached in {cache}, and {urlparse(url).hostname} cannot "
                                   "be reached from here (no network), so the run cannot download it",
                   f"run `bash demo.sh --fetch` (with your --data, --configs and --candidates) on a machine with "
                   f"network and copy {cache} here")


def check_model(role: str, name: str, load) -> Finding:
    """A CLIP or timm name cached (or the download it would need), or a model file that `load(name)` loads."""
    try:
        encoder = parse_encoder_name(name)
    except UserError as error:
        return Finding(FAIL, "models", f"{role}: {error}", "give a CLIP name, a timm name or a CLIP state_dict file")
    if encoder.kind == "clip":
        url = clip.clip._MODELS[name]  # the clip package's own table of weight files
        file = CLIP_CACHE / os.path.basename(url)
        if file.is_file():
            return Finding(OK, "models", f"{role} {name}: cached ({file}, {size_text(file.stat().st_size)})")
        return download_finding(role, name, url, CLIP_CACHE)
    if encoder.kind == "timm" and not encoder.file:  # timm:NAME@FILE: a local file, loaded below
        return check_timm_model(role, encoder)
    try:
        load(name)
    except UserError as error:
        return Finding(FAIL, "models", f"{role}: {error}", "give a CLIP name or a CLIP state_dict file")
    return Finding(OK, "models", f"{role} {name}: loads")


def check_timm_model(role: str, encoder: EncoderName) -> Finding:
    """A timm encoder's weights in the Hugging Face cache under the hub id and file they are published as (what
    hw3.p2.encoder loads, and hw3_download.sh fetches), or the download they need."""
    from huggingface_hub.constants import HF_HUB_CACHE

    name, model_name = encoder.text, encoder.timm_model
    try:
        hub_id, filename = timm_weights_source(model_name)
    except UserError as error:
        return Finding(FAIL, "models", f"{role} {name}: {error}", "check the name (timm.list_pretrained())")
    cached = cached_timm_weights(model_name)
    if cached:
        return Finding(OK, "models", f"{role} {name}: cached ({cached})")
    return download_finding(role, name, f"https://huggingface.co/{hub_id}/blob/main/{filename}",
                            Path(HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--")))


def needed_models(inputs: RunInputs, configs: Sequence[TrainConfig]) -> List[Tuple[str, str, Callable]]:
    """Every pretrained model the run loads: (role, name, the loader of a local model file). `demo.sh --fetch`
    fetches the same list that the preflight checks."""
    encoders = sorted({(config.model.encoder, config.model.encoder_layer) for config in configs})
    models = [(f"P2 encoder (layer {layer})", name, functools.partial(load_image_encoder, layer=layer))
              for name, layer in encoders]
    models += [("P1 CLIP", name, load_clip) for name in inputs.p1_models]
    scorers = sorted({config.clip_model for config in configs} | {inputs.clipscore_model})
    return models + [("CLIPScore CLIP", name, load_clip) for name in scorers]


def check_models(inputs: RunInputs, configs: Sequence[TrainConfig]) -> List[Finding]:
    return [check_model(role, name, load) for role, name, load in needed_models(inputs, configs)]


def fetch_models(inputs: RunInputs) -> int:
    """Downloads into their caches every pretrained model of `needed_models` that has a download (CLIP and timm
    names; files need none), each once, going on after a failure; returns 0 when all are cached, else 1."""
    config_findings, configs = check_configs(inputs)
    failed = [finding for finding in config_findings if finding.level == FAIL]
    for finding in failed:
        print(finding, flush=True)
    backbones = {}
    for role, name, _ in needed_models(inputs, configs):
        backbone = encoder_backbone(name)
        if backbone is None:
            print(f"{role} {name}: a local file, nothing to download", flush=True)
        else:
            backbones.setdefault((backbone.library, backbone.name), backbone)
    statuses = [preload_backbone(backbone, verify=load_image_encoder) for backbone in backbones.values()]
    cached = sum(status == DOWNLOAD_OK for status in statuses)
    problems = len(failed) + len(statuses) - cached
    print(f"fetch: {cached} of {len(statuses)} models cached" +
          (f"; {problems} problem(s) above" if problems else "; training needs no network now"), flush=True)
    return 1 if problems else 0


def check_decoder(inputs: RunInputs, course_data: bool) -> Finding:
    try:
        decoder, report = load_decoder_with_report(str(inputs.decoder))
    except UserError as error:
        return Finding(FAIL, "decoder", str(error), "copy the course's decoder_model.bin again (GPT-2 small, about "
                                                    "500 MB)")
    c = decoder.config
    text = (f"{inputs.decoder}: {report}; GPT-2 with {c.n_layer} layers, width {c.n_embd}, vocabulary {c.vocab_size}, "
            f"{sum(p.numel() for p in decoder.parameters()):,} parameters")
    if report.unexpected:
        return Finding(WARN, "decoder", text, "the unexpected keys are not used: is this the course's file?")
    if course_data and (c.n_layer, c.n_embd, c.vocab_size) != (12, 768, 50257):
        return Finding(WARN, "decoder", text + ", not GPT-2 small", "the course's decoder_model.bin is GPT-2 small")
    return Finding(OK, "decoder", text)


# ---- the feature cache ------------------------------------------------------------------------------------------

def check_feature_cache(configs: Sequence[TrainConfig], splits: Optional[List[CaptionSplit]],
                        expected_images: int) -> List[Finding]:
    """The cache's size per encoder and the free disk for it. `splits`: the P2 splits, or None when they did not
    read; then `expected_images` images are counted (0: the size is not computed)."""
    if splits is None and not expected_images:
        return [Finding(WARN, "feature cache", "size not computed: the P2 data did not read", "fix the data first")]
    needs: Dict[Path, float] = {}
    findings = []
    for encoder, layer, cache_dir in sorted({(c.model.encoder, c.model.encoder_layer, c.cache_dir) for c in configs
                                             if c.cache_features}):
        try:
            tokens, width, image_size = encoder_token_shape(encoder)
        except UserError as error:
            findings.append(Finding(FAIL, "feature cache", str(error), "give an encoder that loads"))
            continue
        folder = Path(resolve_cache_dir(cache_dir))
        if splits is None:
            images, which = expected_images, "images (the course's P2 count; the data did not read)"
        else:
            images = sum(len(split.paths) for split in splits if not os.path.isfile(
                feature_cache_path(str(folder), encoder, layer, image_size, split.paths)))
            which = "images not cached yet"
        size = images * tokens * width * 2  # fp16
        needs[folder] = needs.get(folder, 0) + size
        shape = f"{encoder} (layer {layer}): {tokens} tokens x {width} x 2 bytes"
        findings.append(Finding(OK, "feature cache", f"{shape} x {images} {which} = {size_text(size)} in {folder}"
                                if images else f"{shape}: already in {folder}"))
    for folder, size in needs.items():
        existing = next(path for path in [folder, *folder.parents] if path.exists())
        free = shutil.disk_usage(existing).free
        if size > free:
            findings.append(Finding(FAIL, "disk", f"the feature cache needs {size_text(size)} in {folder}, "
                                                  f"{size_text(free)} are free",
                                    "free disk space, or point the configs' cache_dir to a larger disk"))
        else:
            findings.append(Finding(OK, "disk", f"{size_text(free)} free for {folder} (needs {size_text(size)})"))
    return findings


# ---- all of it ------------------------------------------------------------------------------------------------------

def run_preflight(inputs: RunInputs) -> List[Finding]:
    """Every check, printed as it is made; returns the findings."""
    findings: List[Finding] = []

    def report(new: List[Finding]) -> None:
        for finding in new:
            print(finding, flush=True)
        findings.extend(new)

    course_data = inputs.toy_world() is None
    print(f"preflight: {'course data' if course_data else 'toy world data'} {inputs.data}", flush=True)
    report(check_environment(course_data))
    if not inputs.data.is_dir():
        report([Finding(FAIL, "data", f"no data folder {inputs.data}", "give --data DIR with the course's "
                                                                       "p1_data, p2_data, p3_data")])
        splits = []
    else:
        counts, whose = expected_counts(inputs)
        report(check_p1(inputs, counts, whose))
        p2_findings, splits = check_p2(inputs, counts, whose)
        report(p2_findings + [check_p3(inputs, counts, whose)])
    config_findings, configs = check_configs(inputs)
    report(config_findings)
    report(check_models(inputs, configs) + [check_decoder(inputs, course_data)])
    course_images = COURSE_COUNTS["p2 train"] + COURSE_COUNTS["p2 val"] if course_data else 0
    report(check_feature_cache(configs, splits if len(splits) == 2 else None, course_images))
    problems = sum(f.level == FAIL for f in findings)
    warnings = sum(f.level == WARN for f in findings)
    print(f"preflight: {problems} problem(s), {warnings} warning(s): " +
          ("the run cannot succeed until the FAIL lines are fixed" if problems else "ready to run"), flush=True)
    return findings


def passed(findings: Sequence[Finding]) -> bool:
    return not any(finding.level == FAIL for finding in findings)
