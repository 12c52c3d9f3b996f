"""Where the model files come from: the official files on the Hugging Face hub, or a local model bundle.

A model bundle is a directory with fixed names, and no manifest:

    config_dit.yml   dit.pth   content_encoder/   hift.yml   hift.pt   campplus.bin   campplus.json

It is how air-gapped cluster nodes and the tests get weights; `python -m app.bundle DIR` writes one from the hub.
The hub path downloads through huggingface_hub's cache (progress bars included) and honours `HF_HUB_OFFLINE`. It
fetches only the named files, each at its own revision (below); no file of a repository is fetched unasked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from app.model.config import load_config

HUB = "hub"  # the model source that means "the official files by hub id"
# The revision every hub file is fetched at unless it names another: the repository's latest. To freeze the weights
# a deployment runs, set a file's revision (below) to a commit hash read from its repository's history on the hub.
DEFAULT_REVISION = "main"

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model files cannot be found, fetched or read; the message says what to do."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str = DEFAULT_REVISION  # a branch, tag or commit hash

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}@{self.revision}"


# The official files of the real-time model (seed-uvit-tat-xlsr-tiny), as upstream's real-time GUI fetches them.
HUB_DIT_CHECKPOINT = HubFile("Plachta/Seed-VC", "DiT_uvit_tat_xlsr_ema.pth")
HUB_DIT_CONFIG = HubFile("Plachta/Seed-VC", "config_dit_mel_seed_uvit_xlsr_tiny.yml")
HUB_VOCODER = HubFile("FunAudioLLM/CosyVoice-300M", "hift.pt")
HUB_SPEAKER_ENCODER = HubFile("funasr/campplus", "campplus_cn_common.bin")
HUB_NAMED_FILES = (HUB_DIT_CONFIG, HUB_DIT_CHECKPOINT, HUB_VOCODER, HUB_SPEAKER_ENCODER)
# The content encoder's repository is named by the DiT config (facebook/wav2vec2-xls-r-300m); its revision:
CONTENT_ENCODER_REVISION = DEFAULT_REVISION
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


def _fetch(what: str, download: Callable[[], T]) -> T:
    try:
        return download()
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(_offline_advice(what)) from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise ModelLoadError(f"{what} does not exist on the hub: {error}") from error
    except HfHubHTTPError as error:
        raise ModelLoadError(f"downloading {what} failed: {error}") from error


def hub_file(file: HubFile, cached_only: bool = False) -> Path:
    """One file by hub id, through the cache (a progress bar shows while it downloads); `cached_only`: no network."""
    return Path(
        _fetch(
            str(file),
            lambda: hf_hub_download(
                repo_id=file.repo_id, filename=file.filename, revision=file.revision, local_files_only=cached_only
            ),
        )
    )


def hub_model_folder(repo_id: str, cached_only: bool = False) -> Path:
    """A transformers model folder by hub id, through the cache: only CONTENT_ENCODER_PATTERNS' files."""
    return Path(
        _fetch(
            f"the model folder {repo_id}@{CONTENT_ENCODER_REVISION}",
            lambda: snapshot_download(
                repo_id=repo_id,
                revision=CONTENT_ENCODER_REVISION,
                allow_patterns=list(CONTENT_ENCODER_PATTERNS),
                local_files_only=cached_only,
            ),
        )
    )


def hub_files(cached_only: bool = False) -> ModelFiles:
    """The official files, fetched (or found in the cache) by hub id; `cached_only`: from the cache or not at all."""
    config_path = hub_file(HUB_DIT_CONFIG, cached_only)
    encoder_id = load_config(config_path).content_encoder.name
    return ModelFiles(
        dit_config=config_path,
        dit_checkpoint=hub_file(HUB_DIT_CHECKPOINT, cached_only),
        content_encoder=hub_model_folder(encoder_id, cached_only),
        vocoder_checkpoint=hub_file(HUB_VOCODER, cached_only),
        speaker_encoder_checkpoint=hub_file(HUB_SPEAKER_ENCODER, cached_only),
    )


def check_hub_files() -> None:
    """That the official files can be had on this machine, without downloading them: every one is in the cache, or
    the hub answers for each named file at its revision. Raises ModelLoadError with what to do otherwise."""
    try:
        hub_files(cached_only=True)
        return
    except ModelLoadError:
        pass  # not all cached: the hub has to answer
    for file in HUB_NAMED_FILES:
        # dry_run asks the hub for the file's metadata (or finds it cached) and downloads nothing.
        _fetch(
            str(file),
            partial(
                hf_hub_download, repo_id=file.repo_id, filename=file.filename, revision=file.revision, dry_run=True
            ),
        )


def resolve_files(source: str | Path) -> ModelFiles:
    """`hub` (the default everywhere) or the path of a model bundle directory."""
    return hub_files() if str(source) == HUB else bundle_files(Path(source))
