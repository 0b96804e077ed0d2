"""Fetches the trained checkpoints (sha256-verified) and pre-loads the pretrained backbones that checkpoints.json
lists, plus the image encoder that each fetched checkpoint's config in checkpoints.json names (and no other): what
`bash hw3_download.sh` runs (hw3/common/download.py).

Exit status: 0 all done; 1 a download, checksum or backbone failed; 2 bad arguments or manifest; 3 a checkpoint is
not published yet and not present.
"""
import argparse
from pathlib import Path

from hw3.common.download import download_all
from hw3.common.errors import run_cli
from hw3.common.manifest import MANIFEST, REPO_ROOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch the trained checkpoints (sha256-verified) and pre-load the pretrained backbones.",
        epilog="Exit status: 0 all done; 1 a download, checksum or backbone failed; 2 bad arguments or manifest; "
               "3 a checkpoint is not published yet and not present.")
    parser.add_argument("--manifest", type=Path, default=MANIFEST,
                        help="the list of checkpoints and backbones (default: %(default)s)")
    parser.add_argument("--dest-root", type=Path, default=REPO_ROOT,
                        help="folder that the checkpoint paths are relative to (default: the repo root)")
    parser.add_argument("--skip-backbones", action="store_true", help="only fetch the checkpoints")
    args = parser.parse_args(argv)
    return download_all(args.manifest, args.dest_root, skip_backbones=args.skip_backbones,
                        verify_encoder=load_encoder_offline)


def load_encoder_offline(name: str) -> None:
    """Builds the P2 image encoder `name` from the cache just filled, as hw3_2.sh will (a check that it loads)."""
    from hw3.p2.encoder import load_image_encoder  # imported here: torch and timm load only when a backbone needs it
    load_image_encoder(name)


if __name__ == "__main__":
    run_cli(main, "hw3_download.py")
