"""What one pipeline run reads (RunInputs) and where it writes (ResultPaths).

Both modes of demo.py fill the same RunInputs, and everything after that (preflight, every step) sees only it, so
the toy run and a real run are one code path with other arguments:
- default: the toy world's hw3_data, configs/toy_*.yaml, its decoder_model.bin, and its tiny CLIP as the P2
  encoder, the P1 model and the CLIPScore model;
- `--data DIR`: DIR in the course layout, configs/{adapter,prefix,lora}.yaml, DIR/p2_data/decoder_model.bin, and
  each tool's own models (the configs' encoder ViT-L/14, p1_clip.py's ViT-L/14, the course's ViT-B/32 CLIPScore).
`--configs`, `--decoder`, `--encoder` and `--clip-model` replace any of these in either mode.
"""
import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from hw3.common.encoder_names import parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.files import REPO_ROOT
from hw3.common.layout import CourseLayout
from hw3.p1.zero_shot import DEFAULT_MODELS
from hw3.p2.config import TrainConfig
from hw3.p2.peft import PEFT_KINDS
from hw3.toy.world import ToyWorld

# The course data's runs: one per PEFT kind on CLIP ViT-L/14 (what the report compares); the stronger frozen encoders
# (docs/encoders.md) are candidates trained only when asked (--candidates), after the submission is ready.
ENCODER_CANDIDATES = ("configs/siglip_adapter.yaml", "configs/dfn5b_adapter.yaml")
CONFIG_SETS = {"toy": tuple(f"configs/toy_{method}.yaml" for method in PEFT_KINDS),
               "real": tuple(f"configs/{method}.yaml" for method in PEFT_KINDS)}
SCST_CONFIGS = {"toy": "configs/toy_scst.yaml", "real": "configs/scst.yaml"}
TOY_WORLD_NAME = "toyworld-seed0"  # the cache root's full toy world, shared with the tests


def model_source(name: Optional[str]) -> Optional[str]:
    """A model as the commands get it: a CLIP or timm name as given, a file as an absolute path (the commands run
    from the repository root, and the path is stored in checkpoints, so both modes must spell it alike)."""
    if name is None or parse_encoder_name(name).kind != "file":
        return name
    return os.path.abspath(os.path.expanduser(name))


def config_path(name: str) -> str:
    """A config file as the commands get it: relative to the repository when inside it (p2_train.py saves it in
    the run's summary), else absolute."""
    path = Path(os.path.abspath(os.path.expanduser(name)))
    return str(path.relative_to(REPO_ROOT)) if REPO_ROOT in path.parents else str(path)


@dataclass(frozen=True)
class RunInputs:
    """The data (course layout), the P2 training configs and the pretrained models of one run."""
    data: Path  # p1_data, p2_data, p3_data
    configs: Tuple[str, ...]  # P2 cross-entropy configs, one run each
    decoder: Path  # the course's GPT-2 (decoder_model.bin)
    encoder: Optional[str] = None  # P2's frozen image encoder; None: each config's model.encoder
    clip_model: Optional[str] = None  # the P1 model and the CLIPScore model; None: p1_clip.py's and the configs'
    scst_config: Optional[str] = None  # the self-critical stage's config; None: no SCST stage
    candidates: Tuple[str, ...] = ()  # encoder-candidate configs, trained after the submission is ready

    @property
    def layout(self) -> CourseLayout:  # the files of `data`
        return CourseLayout(self.data)

    @property
    def p1_models(self) -> Tuple[str, ...]:
        return (self.clip_model,) if self.clip_model else DEFAULT_MODELS

    @property
    def clipscore_model(self) -> str:
        return self.clip_model or TrainConfig().clip_model  # the course's scorer's ViT-B/32

    def toy_world(self) -> Optional[ToyWorld]:
        """The toy world whose hw3_data this is (its boxes make P3's grounding score), or None (course data)."""
        world = ToyWorld(self.data.parent)
        return world if world.manifest_path.is_file() and world.boxes.is_file() else None

    def train_overrides(self) -> List[str]:
        """p2_train.py `--set` values naming the data and models of a cross-entropy run (an SCST run takes them from
        the run it starts from)."""
        overrides = [f"data_dir={self.layout.p2_data}", f"decoder_weights={self.decoder}"]
        if self.encoder:
            overrides.append(f"model.encoder={self.encoder}")
        if self.clip_model:
            overrides.append(f"clip_model={self.clip_model}")
        return overrides


@dataclass(frozen=True)
class ResultPaths:
    """The results folder of a run."""
    root: Path

    @property
    def p1(self) -> Path:  # p1_clip.py report's files, and pred.csv of hw3_1.sh
        return self.root / "p1"

    @property
    def p1_csv(self) -> Path:
        return self.p1 / "pred.csv"

    @property
    def p2(self) -> Path:  # one p2_train.py run folder per config, and the submitted captions' files
        return self.root / "p2"

    def run(self, config: str) -> Path:
        return self.p2 / Path(config).stem

    @property
    def val_predictions(self) -> Path:  # hw3_2.sh's output for the val images
        return self.p2 / "val_pred.json"

    @property
    def val_scores_csv(self) -> Path:
        return self.p2 / "val_scores.csv"

    @property
    def val_scores(self) -> Path:  # the report reads it here
        return self.p2 / "val_scores.json"

    @property
    def p3(self) -> Path:
        return self.root / "p3"

    @property
    def grounding(self) -> Path:  # grounding.json / .csv (toy world only)
        return self.p3 / "grounding"

    @property
    def p3_figures(self) -> Path:  # the p3 images' figures and attention.json
        return self.p3 / "images"

    @property
    def top_last(self) -> Path:  # the top-1 and last-1 val images' figures
        return self.p3 / "top_last"

    @property
    def submission(self) -> Path:  # which run is submitted and by which rule (the report reads it)
        return self.p2 / "submission.json"

    def report(self, student_id: Optional[str] = None) -> Path:  # the course names it hw3_<studentID>.pdf
        return self.root / (f"hw3_{student_id}.pdf" if student_id else "hw3_report.pdf")

    @property
    def notes(self) -> Path:  # the student's answers to the report's prose questions (a draft until edited)
        return self.root / "notes.md"

    @property
    def numbers(self) -> Path:
        return self.root / "numbers.json"

    @property
    def steps(self) -> Path:  # what each finished step ran (hw3.pipeline.steps)
        return self.root / "steps.json"

    @property
    def logs(self) -> Path:  # the output of the steps that ran at once (StepRunner.run_together)
        return self.root / "logs"


# ---- the command line (demo.py and preflight.py) ------------------------------------------------------------------

def add_input_options(parser: argparse.ArgumentParser) -> None:
    """The options that replace a run's configs and models (see the module docstring for the defaults)."""
    parser.add_argument("--configs", nargs="+", metavar="toy|real|FILE",
                        help="P2 configs: toy (configs/toy_{adapter,prefix,lora}.yaml), real "
                             "(configs/{adapter,prefix,lora}.yaml, CLIP ViT-L/14) or config files (default: toy "
                             "without --data, real with it)")
    parser.add_argument("--candidates", action="store_true",
                        help="with --data: after the submission is ready, also train the encoder candidates "
                             "configs/{siglip,dfn5b}_adapter.yaml (projected on a 2080 Ti: about 1 hour each, cache "
                             "build included, and 44 GB more feature cache; docs/encoders.md); the self-critical "
                             "stage runs on a candidate only if it beats the submission, which it then replaces")
    parser.add_argument("--decoder", help="the course's GPT-2 decoder_model.bin (default: the toy world's; with "
                                          "--data: DATA/p2_data/decoder_model.bin)")
    parser.add_argument("--encoder", help="P2's frozen image encoder: a CLIP name, timm:NAME or a CLIP state_dict "
                                          "file (default: the toy world's clip.pt; with --data: each config's)")
    parser.add_argument("--clip-model", help="P1's CLIP and the CLIPScore model: a CLIP name or state_dict file "
                                             "(default: the toy world's clip.pt; with --data: ViT-L/14 for P1, "
                                             "ViT-B/32 for CLIPScore)")
    parser.add_argument("--scst-config", help="the self-critical stage's config (default: configs/toy_scst.yaml "
                                              "with --configs toy, else configs/scst.yaml)")
    parser.add_argument("--no-scst", action="store_true", help="no self-critical stage")


def configs_of(choice: Sequence[str]) -> Tuple[str, ...]:
    if len(choice) == 1 and choice[0] in CONFIG_SETS:
        return CONFIG_SETS[choice[0]]
    return tuple(config_path(name) for name in choice)


def inputs_from_args(args: argparse.Namespace, data: Optional[Path], world: Optional[ToyWorld]) -> RunInputs:
    """RunInputs of the options: the toy world's files (`world`, when no data folder is given) or `data`'s
    defaults, each replaced by its option when given."""
    if (data is None) == (world is None):
        raise ValueError("give the data folder or the toy world, not both")
    choice = args.configs or (["toy"] if world else ["real"])
    if world:
        data, decoder, encoder, clip_model = world.data, world.decoder, str(world.clip), str(world.clip)
    else:
        data = Path(os.path.abspath(os.path.expanduser(data)))
        decoder, encoder, clip_model = CourseLayout(data).decoder, None, None
    scst = None if args.no_scst else config_path(args.scst_config or SCST_CONFIGS[
        "toy" if choice == ["toy"] else "real"])
    inputs = RunInputs(data=Path(os.path.abspath(data)), configs=configs_of(choice),
                       decoder=Path(os.path.abspath(os.path.expanduser(args.decoder or decoder))),
                       encoder=model_source(args.encoder or encoder),
                       clip_model=model_source(args.clip_model or clip_model), scst_config=scst)
    if args.candidates:
        if world:
            raise UserError("--candidates needs --data: the candidates' encoders are real pretrained models")
        inputs = replace(inputs, candidates=ENCODER_CANDIDATES)
    configs = inputs.configs + inputs.candidates
    if len({Path(config).stem for config in configs}) < len(configs):
        raise UserError(f"--configs: two configs share a file name, so their run folders would too: {configs}")
    return inputs
