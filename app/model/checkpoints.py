"""Reading checkpoint files and loading them into our modules: one loader, a layout per model, clear errors.

A checkpoint's keys are rarely our module's: upstream's DiT sits under `estimator.` (and `module.` when trained
with DistributedDataParallel), CosyVoice's HiFT stores weight norm as `weight_g`/`weight_v`, funasr's CAMPPlus keeps
its last layer inside `xvector`. Each model declares a `CheckpointLayout` next to its module: the hooks that turn the
file's state into the module's (and back, to write files in the upstream layout), the weights upstream builds but the
real-time path never runs, and whether any other extra weight is an error.

`load_state` applies a layout and loads strictly: a weight the module needs that is missing or has another shape is
an error that names every such key. It means the file is not the checkpoint the config describes, and silently
running half-random weights would produce noise.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from app.model.sources import ModelLoadError

log = logging.getLogger(__name__)

State = dict[str, Tensor]
# How many keys an error lists; a checkpoint of another model can differ in hundreds.
_LISTED_KEYS = 10


class CheckpointMismatch(ModelLoadError):
    """The checkpoint does not fit the module its config builds; the message names the keys."""


def read_checkpoint(path: Path, what: str) -> Any:
    """torch.load with weights_only=True: checkpoints may come from object stores, so never run pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelLoadError(f"{what} checkpoint {path} does not exist") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ModelLoadError(f"{what} checkpoint {path} is not a readable PyTorch weights file: {error}") from error


class StateHook(Protocol):
    """One step between a file's layout and a module's. A hook that finds the file wrong raises CheckpointMismatch
    naming the file's keys; `load_state` adds which checkpoint it was."""

    def to_module(self, module: nn.Module, state: State) -> State: ...

    def to_file(self, module: nn.Module, state: State) -> State: ...


@dataclass(frozen=True)
class RenamePrefix:
    """Weights under `file_prefix` in the file live under `module_prefix` in the module (either may be empty).

    Keys without the prefix pass unchanged, so a file already in the module's layout loads too.
    """

    file_prefix: str
    module_prefix: str

    def to_module(self, module: nn.Module, state: State) -> State:
        return _renamed(state, self.file_prefix, self.module_prefix)

    def to_file(self, module: nn.Module, state: State) -> State:
        return _renamed(state, self.module_prefix, self.file_prefix)


def _renamed(state: State, old: str, new: str) -> State:
    renamed: State = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new_key = new + key.removeprefix(old) if key.startswith(old) else key
        if new_key in renamed:
            raise CheckpointMismatch(f"both {origin[new_key]!r} and {key!r} hold the weight {new_key!r}")
        renamed[new_key] = value
        origin[new_key] = key
    return renamed


@dataclass(frozen=True)
class StripPrefix:
    """A prefix some files carry and others do not (DistributedDataParallel's `module.`): removed on load, never
    written."""

    prefix: str

    def to_module(self, module: nn.Module, state: State) -> State:
        return _renamed(state, self.prefix, "")

    def to_file(self, module: nn.Module, state: State) -> State:
        return dict(state)


@dataclass(frozen=True)
class FoldWeightNorm:
    """Legacy weight norm in the file (torch.nn.utils.weight_norm's `weight_v` and `weight_g`), a plain `weight` in
    the module, for the submodules `applies(name, submodule)` picks.

    `weight_v` is the direction, shaped like the weight; `weight_g` one gain per slice along dim 0. The weight is
    g * v / ||v||, the norm over every dim but 0; folding it once at load time is what upstream computes per call.
    """

    applies: Callable[[str, nn.Module], bool]

    def _names(self, module: nn.Module) -> list[str]:
        return [name for name, submodule in module.named_modules() if self.applies(name, submodule)]

    def to_module(self, module: nn.Module, state: State) -> State:
        expected = module.state_dict()
        problems: list[str] = []
        for name in self._names(module):
            shape = tuple(expected[f"{name}.weight"].shape)
            for part, part_shape in (("weight_v", shape), ("weight_g", (shape[0],) + (1,) * (len(shape) - 1))):
                key = f"{name}.{part}"
                if key not in state:
                    problems.append(f"missing key {key}")
                elif tuple(state[key].shape) != part_shape:
                    problems.append(f"wrong shape {key} (file {tuple(state[key].shape)}, model {part_shape})")
        if problems:
            raise CheckpointMismatch("; ".join(problems))
        folded = dict(state)
        for name in self._names(module):
            direction, gain = folded.pop(f"{name}.weight_v"), folded.pop(f"{name}.weight_g")
            # The same kernel torch.nn.utils.weight_norm runs on every call upstream.
            folded[f"{name}.weight"] = torch._weight_norm(direction, gain, 0)
        return folded

    def to_file(self, module: nn.Module, state: State) -> State:
        # v = the weight itself and g = its norm: the loader folds them back to the weight (to float rounding).
        unfolded = dict(state)
        for name in self._names(module):
            weight = unfolded.pop(f"{name}.weight")
            unfolded[f"{name}.weight_v"] = weight
            unfolded[f"{name}.weight_g"] = torch.norm_except_dim(weight, 2, 0)
        return unfolded


@dataclass(frozen=True)
class CheckpointLayout:
    """How one model's checkpoint maps onto its module."""

    what: str  # names the checkpoint in every message, e.g. "HiFT vocoder"
    hooks: tuple[StateHook, ...] = ()  # file -> module, in order
    # Module-layout key prefixes of weights upstream builds but the real-time path never runs: skipped quietly.
    unused: tuple[str, ...] = ()
    # Whether any other weight the module lacks is an error; False logs and skips them, as upstream's DiT loader does.
    strict_extras: bool = True
    hint: str = ""  # one sentence on the likely cause, added to mismatch errors

    def to_module(self, module: nn.Module, state: Mapping[str, Tensor]) -> State:
        mapped = dict(state)
        for hook in self.hooks:
            mapped = hook.to_module(module, mapped)
        return mapped

    def to_file(self, module: nn.Module, state: Mapping[str, Tensor]) -> State:
        """The module's `state` in the file's layout (to write checkpoints upstream's code reads)."""
        unmapped = dict(state)
        for hook in reversed(self.hooks):
            unmapped = hook.to_file(module, unmapped)
        return unmapped

    def mismatch(self, source: object, details: str) -> CheckpointMismatch:
        where = f" {source}" if source is not None else ""
        hint = f" {self.hint}" if self.hint else ""
        return CheckpointMismatch(f"the {self.what} checkpoint{where} does not match its config: {details}.{hint}")


def load_state(module: nn.Module, state: Mapping[str, Tensor], layout: CheckpointLayout, source: object = None) -> None:
    """Load a checkpoint's `state` into `module` through `layout`; CheckpointMismatch names every wrong key.

    `source` (the file, when there is one) goes into the message.
    """
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise layout.mismatch(source, "it does not hold a state dict (names to tensors)")
    try:
        mapped = layout.to_module(module, state)
    except CheckpointMismatch as error:
        raise layout.mismatch(source, str(error)) from None
    expected = module.state_dict()
    missing = [key for key in expected if key not in mapped]
    wrong_shape = [
        f"{key} (file {tuple(mapped[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in mapped and mapped[key].shape != expected[key].shape
    ]
    extra = [key for key in mapped if key not in expected and not key.startswith(layout.unused)]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_listed(wrong_shape)}")
    if extra and layout.strict_extras:
        problems.append(f"unexpected keys {_listed(extra)}")
    if problems:
        raise layout.mismatch(source, "; ".join(problems))
    if extra:
        log.warning("%s checkpoint: ignoring %d unknown weights: %s", layout.what, len(extra), _listed(extra))
    module.load_state_dict({key: mapped[key] for key in expected})


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return f"[{shown}]" if len(keys) <= _LISTED_KEYS else f"[{shown}, ...] ({len(keys)} in all)"
