"""The stream controls (app/serving/controls.py) as command-line flags: one definition for both CLIs.

The streaming client (client/stream_client.py) sends the flags given as its start message's `controls`; the file CLI
(app/convert.py) applies them to its blocks with the service's own code. Both check them against the protocol's
ranges (app/transport/protocol.py) before any work starts, so that a value the server would refuse fails at once
with the flag's name instead of as the server's `bad_message` after a connection. A flag not given is absent from
the result: the stream keeps its neutral default (or, for the silence threshold, the server's configured gate).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.transport.protocol import (
    GAIN_DB_RANGE,
    PITCH_SHIFT_RANGE,
    RMS_MIX_RATE_RANGE,
    SILENCE_HANGOVER_RANGE,
    SILENCE_THRESHOLD_RANGE,
    ControlOverrides,
    Range,
)


@dataclass(frozen=True)
class ControlFlag:
    field: str  # the ControlOverrides / StreamControls field
    flag: str
    help: str
    bounds: Range | None = None  # None: an on/off switch
    metavar: str = ""


CONTROL_FLAGS = (
    ControlFlag("pitch_shift", "--pitch", "shift the voice N semitones, formants kept", PITCH_SHIFT_RANGE, "N"),
    ControlFlag(
        "silence_threshold_dbfs",
        "--silence-threshold",
        "input quieter than this is silence: the model is skipped and silence sent",
        SILENCE_THRESHOLD_RANGE,
        "DBFS",
    ),
    ControlFlag(
        "silence_hangover_s",
        "--hangover",
        "keep converting this long after the input was last above the silence threshold (word ends)",
        SILENCE_HANGOVER_RANGE,
        "S",
    ),
    ControlFlag("input_gain_db", "--input-gain", "gain on the input, before conversion", GAIN_DB_RANGE, "DB"),
    ControlFlag("output_gain_db", "--output-gain", "gain on the converted voice", GAIN_DB_RANGE, "DB"),
    ControlFlag(
        "rms_mix_rate",
        "--rms-mix-rate",
        "loudness: 1 keeps the model's, 0 follows the input's, between mixes the two (default 1)",
        RMS_MIX_RATE_RANGE,
        "R",
    ),
    ControlFlag("noise_suppression", "--noise-suppression", "suppress noise in the input (RNNoise; adds 20 ms)"),
    ControlFlag("monitor", "--monitor", "hear the input itself, unconverted, through the same path (latency check)"),
)
FLAGS_BY_FIELD = {control.field: control for control in CONTROL_FLAGS}


class ControlError(ValueError):
    """A control outside the protocol's range, or not of its type; the message names the flag (or the key)."""


def add_control_flags(parser: argparse.ArgumentParser, *, without: frozenset[str] = frozenset()) -> None:
    """Adds a flag per control (except the fields in `without`), each with the control's field as its dest and None
    when not given."""
    group = parser.add_argument_group("stream controls (each neutral unless given)")
    for control in CONTROL_FLAGS:
        if control.field in without:
            continue
        if control.bounds is None:
            group.add_argument(control.flag, dest=control.field, action="store_const", const=True, help=control.help)
        else:
            low, high = control.bounds
            group.add_argument(
                control.flag,
                dest=control.field,
                type=float,
                metavar=control.metavar,
                help=f"{control.help} ({low:g} to {high:g})",
            )


def given_controls(args: argparse.Namespace) -> dict[str, Any]:
    """The controls given on the command line (checked by `check_controls`), by field."""
    values = {control.field: getattr(args, control.field, None) for control in CONTROL_FLAGS}
    return check_controls(values, lambda field: FLAGS_BY_FIELD[field].flag)


def check_controls(values: Mapping[str, Any], name: Callable[[str], str]) -> dict[str, Any]:
    """The values that are not None, checked with the protocol's own model and ranges; raises ControlError with the
    offending value's name as `name(field)` gives it (a flag, or a manifest line's key)."""
    given = {field: value for field, value in values.items() if value is not None}
    try:
        return ControlOverrides(**given).changes()
    except ValidationError as error:
        problem = error.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        control = FLAGS_BY_FIELD.get(field)
        if control is None:
            raise ControlError(f"{name(field) if field else 'controls'}: {problem['msg']}") from None
        if control.bounds is None:
            raise ControlError(f"{name(field)}: expected true or false, got {given[field]!r}") from None
        low, high = control.bounds
        raise ControlError(f"{name(field)}: {given[field]!r} is outside {low:g} to {high:g}") from None
