"""Where the model files come from: the official files on the Hugging Face hub, or a local model bundle.

A model bundle is a directory with fixed names, and no manifest:

    config_dit.yml   dit.pth   content_encoder/   hift.yml   hift.pt   campplus.bin   campplus.json

It is how air-gapped cluster nodes and the tests get weights; `python -m app.bundle DIR` writes one from the hub.
The hub path downloads through huggingface_hub's cache (progress bars included) and honours `HF_HUB_OFFLINE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from app.model.config import load_config

HUB = "hub"  # the model source that means "the official files by hub id"


class ModelLoadError(RuntimeError):
    """The model files cannot be found, fetched or read; the message says what to do."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str


# The official files of the real-time model (seed-uvit-tat-xlsr-tiny), as upstream's real-time GUI fetches them.
HUB_DIT_CHECKPOINT = HubFile("Plachta/Seed-VC", "DiT_uvit_tat_xlsr_ema.pth")
HUB_DIT_CONFIG = HubFile("Plachta/Seed-VC", "config_dit_mel_seed_uvit_xlsr_tiny.yml")
HUB_VOCODER = HubFile("FunAudioLLM/CosyVoice-300M", "hift.pt")
HUB_SPEAKER_ENCODER = HubFile("funasr/campplus", "campplus_cn_common.bin")
# Only what transformers needs to build Wav2Vec2Model; the hub repo also holds files we never read.
CONTENT_ENCODER_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "pytorch_model.bin",
)

BUNDLE_DIT_CONFIG = "config_dit.yml"
BUNDLE_DIT_CHECKPOINT = "dit.pth"
BUNDLE_CONTENT_ENCODER = "content_encoder"
BUNDLE_VOCODER_CONFIG = "hift.yml"
BUNDLE_VOCODER = "hift.pt"
BUNDLE_SPEAKER_ENCODER = "campplus.bin"
BUNDLE_SPEAKER_ENCODER_CONFIG = "campplus.json"
BUNDLE_NAMES = (
    BUNDLE_DIT_CONFIG,
    BUNDLE_DIT_CHECKPOINT,
    BUNDLE_CONTENT_ENCODER,
    BUNDLE_VOCODER_CONFIG,
    BUNDLE_VOCODER,
    BUNDLE_SPEAKER_ENCODER,
    BUNDLE_SPEAKER_ENCODER_CONFIG,
)


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of every file the model is built from.

    The hub's vocoder and speaker encoder ship without configs (upstream keeps them in its own code): for those the
    config paths are None and the named defaults in app/model/hift.py and campplus.py apply.
    """

    dit_config: Path
    dit_checkpoint: Path
    content_encoder: Path  # a transformers model folder
    vocoder_checkpoint: Path
    speaker_encoder_checkpoint: Path
    vocoder_config: Path | None = None
    speaker_encoder_config: Path | None = None


def bundle_files(directory: Path) -> ModelFiles:
    """The files of a model bundle directory; a missing name is reported with the full expected layout."""
    if not directory.is_dir():
        raise ModelLoadError(f"no model bundle at {directory}: not a directory")
    missing = [name for name in BUNDLE_NAMES if not (directory / name).exists()]
    if missing:
        raise ModelLoadError(
            f"model bundle {directory} lacks {', '.join(missing)}; a bundle holds exactly: {', '.join(BUNDLE_NAMES)}"
            " (write one with `python -m app.bundle DIR`)"
        )
    return ModelFiles(
        dit_config=directory / BUNDLE_DIT_CONFIG,
        dit_checkpoint=directory / BUNDLE_DIT_CHECKPOINT,
        content_encoder=directory / BUNDLE_CONTENT_ENCODER,
        vocoder_checkpoint=directory / BUNDLE_VOCODER,
        speaker_encoder_checkpoint=directory / BUNDLE_SPEAKER_ENCODER,
        vocoder_config=directory / BUNDLE_VOCODER_CONFIG,
        speaker_encoder_config=directory / BUNDLE_SPEAKER_ENCODER_CONFIG,
    )


def _offline_advice(what: str) -> str:
    return (
        f"{what} is not in the Hugging Face cache and cannot be downloaded here (HF_HUB_OFFLINE is set or the hub "
        "is unreachable). Either run once with network access so the cache fills, or write a model bundle on a "
        "connected machine with `python -m app.bundle DIR`, copy it here and pass its path as the model."
    )


def _fetch(what: str, download: Callable[[], str]) -> Path:
    try:
        return Path(download())
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(_offline_advice(what)) from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise ModelLoadError(f"{what} does not exist on the hub: {error}") from error
    except HfHubHTTPError as error:
        raise ModelLoadError(f"downloading {what} failed: {error}") from error


def hub_file(file: HubFile) -> Path:
    """One file by hub id, through the cache (a progress bar shows while it downloads)."""
    return _fetch(
        f"{file.repo_id}/{file.filename}",
        lambda: hf_hub_download(repo_id=file.repo_id, filename=file.filename),
    )


def hub_model_folder(repo_id: str) -> Path:
    """A transformers model folder by hub id, through the cache."""
    return _fetch(
        f"the model folder {repo_id}",
        lambda: snapshot_download(repo_id=repo_id, allow_patterns=list(CONTENT_ENCODER_PATTERNS)),
    )


def hub_files() -> ModelFiles:
    """The official files, fetched (or found in the cache) by hub id."""
    config_path = hub_file(HUB_DIT_CONFIG)
    encoder_id = load_config(config_path).content_encoder.name
    return ModelFiles(
        dit_config=config_path,
        dit_checkpoint=hub_file(HUB_DIT_CHECKPOINT),
        content_encoder=hub_model_folder(encoder_id),
        vocoder_checkpoint=hub_file(HUB_VOCODER),
        speaker_encoder_checkpoint=hub_file(HUB_SPEAKER_ENCODER),
    )


def resolve_files(source: str | Path) -> ModelFiles:
    """`hub` (the default everywhere) or the path of a model bundle directory."""
    return hub_files() if str(source) == HUB else bundle_files(Path(source))
