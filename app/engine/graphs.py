"""CUDA graphs of the engine's hot calls, one per static input shape, captured at warm-up and replayed after.

A GPU step of small batched kernels is launch-bound: the DiT alone launches hundreds of kernels per Euler step. A
captured graph replays them all with one launch. Graphs need static shapes and static memory, so the engine pads
batches to a few warmed shapes (app/engine/plan.py) and each graph owns input buffers that a call copies into.

Capture happens only in warm-up (`capture`): a shape that was never captured is not captured on the hot path, where
it would stall every session of the step; the caller runs it eagerly and counts it. A capture that fails (an op
that syncs with the host, say) is logged with its reason and leaves that shape eager for good: never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.model.cfm import EstimatorInputs, FlowBatch, estimator_inputs
from app.model.hift import HiFTNoise
from app.model.seedvc import SeedVC
from app.streaming.blocks import EagerStages

log = logging.getLogger(__name__)

Outputs = tuple[Tensor, ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static buffers the graph reads
    outputs: Outputs  # static buffers the graph writes
    # What was last copied into each input, held so its identity stays unique: a source passed again (the estimator's
    # inputs, the same for every Euler step of a block) is not copied again. Sources are never changed in place.
    sources: list[Tensor | None]


@dataclass
class GraphCache:
    """The captured graphs of one function `fn(*tensors) -> tuple of tensors`, by shape key."""

    name: str
    fn: Callable[..., Outputs]
    pool: torch.cuda._POOL_HANDLE | None = None  # a memory pool shared with other caches (replays never overlap)
    warmup_calls: int = 2
    _graphs: dict[Hashable, _Captured] = field(default_factory=dict)
    failed: dict[Hashable, str] = field(default_factory=dict)  # key -> why its capture failed

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key: Hashable, inputs: Sequence[Tensor]) -> bool:
        """Capture `fn` for inputs shaped like these (their values are only used to warm up). False if it failed."""
        if key in self._graphs or key in self.failed:
            return key in self._graphs
        static = [tensor.clone() for tensor in inputs]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_calls):  # lazy init, cuBLAS workspaces, algorithm choice
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*static)
        except RuntimeError as error:  # e.g. "operation not permitted when stream is capturing"
            self.failed[key] = str(error).splitlines()[0]
            log.warning("%s: cannot capture shape %s as a CUDA graph, it runs eagerly: %s", self.name, key, error)
            torch.cuda.synchronize()
            return False
        self._graphs[key] = _Captured(graph, static, outputs, [None] * len(static))
        return True

    def replay(self, key: Hashable, inputs: Sequence[Tensor]) -> Outputs:
        """Run the captured graph of `key` on `inputs`; the outputs are fresh tensors (the buffers are reused)."""
        captured = self._graphs[key]
        for index, (buffer, source) in enumerate(zip(captured.inputs, inputs, strict=True)):
            if captured.sources[index] is not source:
                buffer.copy_(source)
                captured.sources[index] = source
        captured.graph.replay()
        return tuple(output.clone() for output in captured.outputs)


class ModelGraphs:
    """The model's heavy stages (app/streaming/blocks.py: ModelStages), replaying captured graphs where warmed.

    Stages: the content encoder (by rows), one Euler step of the flow (by rows, frames and guidance; the same graph
    serves every step count, so deadline control does not multiply graphs) and the vocoder up to its iSTFT (by rows).
    """

    def __init__(self, model: SeedVC) -> None:
        self.model = model
        pool = torch.cuda.graph_pool_handle()
        self.content_graphs = GraphCache("content encoder", self._content, pool)
        self.flow_graphs = GraphCache("flow step", self._flow_step, pool)
        self.vocoder_graphs = GraphCache("vocoder", self._spectrum, pool)
        self.eager_calls = 0  # stage calls of a shape that was not captured

    @property
    def caches(self) -> tuple[GraphCache, ...]:
        return (self.content_graphs, self.flow_graphs, self.vocoder_graphs)

    # The functions captured: flat tensors in, a tuple of tensors out.

    def _content(self, windows: Tensor) -> Outputs:
        return (EagerStages(self.model).content(windows),)

    def _flow_step(self, x: Tensor, t: Tensor, dt: Tensor, *estimator: Tensor) -> Outputs:
        return (EagerStages(self.model).euler_step(_unflatten(estimator), x, t, dt),)

    def _spectrum(self, mel: Tensor, phase_u: Tensor, sine_noise: Tensor) -> Outputs:
        return EagerStages(self.model).spectrum(mel, HiFTNoise(phase_u, sine_noise))

    # ModelStages.

    def content(self, windows: Tensor) -> Tensor:
        return self._run(self.content_graphs, _shape_key(windows), [windows])[0]

    def euler_step(self, inputs: EstimatorInputs, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        key = (*_shape_key(x), inputs.gain is not None)
        return self._run(self.flow_graphs, key, [x, t, dt, *_flatten(inputs)])[0]

    def spectrum(self, mel: Tensor, noise: HiFTNoise) -> tuple[Tensor, Tensor]:
        magnitude, phase = self._run(self.vocoder_graphs, _shape_key(mel), [mel, noise.phase_u, noise.sine_noise])
        return magnitude, phase

    def _run(self, cache: GraphCache, key: Hashable, inputs: list[Tensor]) -> Outputs:
        if key in cache:
            return cache.replay(key, inputs)
        self.eager_calls += 1
        return cache.fn(*inputs)

    def capture(self, windows: Tensor, flow: FlowBatch, mel: Tensor, noise: HiFTNoise) -> list[str]:
        """Capture every stage at these inputs' shapes (warm-up only); returns the failures, by stage."""
        inputs = estimator_inputs(flow)
        t = torch.zeros((), device=windows.device)
        captures = [
            (self.content_graphs, _shape_key(windows), [windows]),
            (
                self.flow_graphs,
                (*_shape_key(flow.noise), inputs.gain is not None),
                [flow.noise, t, t, *_flatten(inputs)],
            ),
            (self.vocoder_graphs, _shape_key(mel), [mel, noise.phase_u, noise.sine_noise]),
        ]
        return [f"{cache.name} {key}: {cache.failed[key]}" for cache, key, tensors in captures
                if not cache.capture(key, tensors)]  # fmt: skip


def _shape_key(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _flatten(inputs: EstimatorInputs) -> list[Tensor]:
    optional = [inputs.gain, inputs.cfg] if inputs.gain is not None and inputs.cfg is not None else []
    return [inputs.prompt_mel, inputs.style, inputs.condition, inputs.valid_frames, inputs.in_prompt, *optional]


def _unflatten(tensors: Sequence[Tensor]) -> EstimatorInputs:
    prompt_mel, style, condition, valid_frames, in_prompt, *optional = tensors
    gain, cfg = optional if optional else (None, None)
    return EstimatorInputs(prompt_mel, style, condition, valid_frames, in_prompt, gain, cfg)
