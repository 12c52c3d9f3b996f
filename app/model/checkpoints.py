"""Reading checkpoint files and loading them into our modules with checks that explain what is wrong.

Upstream's loader keeps every checkpoint key that exists in its module with the same shape and loads the rest
non-strictly. We keep its tolerance for keys we do not build (they are listed, with why), but a key our module
needs that is missing or has another shape is an error: it means the file is not a Seed-VC real-time checkpoint
or does not match its config, and silently running half-random weights would produce noise.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.model.sources import ModelLoadError

log = logging.getLogger(__name__)


def read_checkpoint(path: Path, what: str) -> Any:
    """torch.load with weights_only=True: checkpoints may come from object stores, so never run pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelLoadError(f"{what} checkpoint {path} does not exist") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ModelLoadError(f"{what} checkpoint {path} is not a readable PyTorch weights file: {error}") from error


def dit_checkpoint_parts(checkpoint: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The (estimator, length regulator) state dicts of an upstream DiT checkpoint `{'net': {'cfm', ...}}`."""
    net = checkpoint.get("net") if isinstance(checkpoint, Mapping) else None
    if not isinstance(net, Mapping) or not {"cfm", "length_regulator"} <= set(net):
        raise ModelLoadError(
            f"{path} is not a Seed-VC DiT checkpoint: expected {{'net': {{'cfm': ..., 'length_regulator': ...}}}}"
        )

    def clean(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        # Upstream strips DistributedDataParallel's "module." prefix; the estimator lives under "estimator.".
        stripped = {key.removeprefix("module."): value for key, value in state.items()}
        return {key.removeprefix(prefix): value for key, value in stripped.items() if key.startswith(prefix)}

    return clean(net["cfm"], "estimator."), clean(net["length_regulator"])


def load_checked(module: nn.Module, state: Mapping[str, Tensor], what: str, unused: Iterable[str]) -> None:
    """Load `state` into `module`: every module key must be present with its shape.

    Keys of the file that the module does not have are fine when they start with one of the `unused` prefixes
    (weights upstream builds but the real-time path never runs); any other extra key is logged.
    """
    expected = module.state_dict()
    missing = sorted(key for key in expected if key not in state)
    wrong_shape = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    )
    if missing or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {len(missing)} weights, e.g. {', '.join(missing[:5])}")
        if wrong_shape:
            details.append(f"wrong shapes: {', '.join(wrong_shape[:5])}")
        raise ModelLoadError(
            f"the {what} checkpoint does not match its config ({'; '.join(details)}). "
            "Is it a Seed-VC real-time (xlsr-tiny) checkpoint, with the config it was trained with?"
        )
    unused_prefixes = tuple(unused)
    unknown = sorted(key for key in state if key not in expected and not key.startswith(unused_prefixes))
    if unknown:
        log.warning("%s checkpoint: ignoring %d unknown weights, e.g. %s", what, len(unknown), unknown[:5])
    module.load_state_dict({key: state[key] for key in expected})
