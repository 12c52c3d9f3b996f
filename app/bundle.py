"""Write a model bundle (the fixed-name directory air-gapped nodes load from) from the official hub files.

Usage:
    python -m app.bundle DIR            # fetch (or take from the HF cache) and lay out the official files
    python -m app.bundle DIR --force    # overwrite an existing bundle

The hub's HiFT and CAMPPlus files ship without configs; the bundle gets ours (the named defaults that upstream keeps
in its code), so that a bundle is complete on its own. The DiT config is copied with its content-encoder name
pointed at the bundle's `content_encoder/` folder. The finished bundle is loaded once to prove it works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from app.model.campplus import CAMPPlusConfig
from app.model.config import ConfigError
from app.model.hift import HiFTConfig
from app.model.seedvc import SeedVC
from app.model.sources import (
    BUNDLE_CONTENT_ENCODER,
    BUNDLE_DIT_CHECKPOINT,
    BUNDLE_DIT_CONFIG,
    BUNDLE_SPEAKER_ENCODER,
    BUNDLE_SPEAKER_ENCODER_CONFIG,
    BUNDLE_VOCODER,
    BUNDLE_VOCODER_CONFIG,
    ModelFiles,
    ModelLoadError,
    bundle_files,
    hub_files,
)


def write_bundle(files: ModelFiles, directory: Path, force: bool = False) -> None:
    if directory.exists() and any(directory.iterdir()) and not force:
        raise ModelLoadError(f"{directory} is not empty; pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(files.dit_config.read_text())
    config["model_params"]["speech_tokenizer"]["name"] = BUNDLE_CONTENT_ENCODER
    (directory / BUNDLE_DIT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    # The hub cache holds symlinks into its blob store: copy the files they point to.
    shutil.copyfile(files.dit_checkpoint, directory / BUNDLE_DIT_CHECKPOINT)
    shutil.copytree(files.content_encoder, directory / BUNDLE_CONTENT_ENCODER, symlinks=False, dirs_exist_ok=True)
    shutil.copyfile(files.vocoder_checkpoint, directory / BUNDLE_VOCODER)
    shutil.copyfile(files.speaker_encoder_checkpoint, directory / BUNDLE_SPEAKER_ENCODER)
    vocoder = yaml.safe_load(files.vocoder_config.read_text()) if files.vocoder_config else HiFTConfig().to_yaml_dict()
    (directory / BUNDLE_VOCODER_CONFIG).write_text(yaml.safe_dump(vocoder, sort_keys=False))
    speaker = (
        json.loads(files.speaker_encoder_config.read_text())
        if files.speaker_encoder_config
        else dataclasses.asdict(CAMPPlusConfig())
    )
    (directory / BUNDLE_SPEAKER_ENCODER_CONFIG).write_text(json.dumps(speaker, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, help="where to write the bundle")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    args = parser.parse_args(argv)
    try:
        write_bundle(hub_files(), args.directory, force=args.force)
        SeedVC.from_files(bundle_files(args.directory))
    except (ModelLoadError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model bundle written to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
