"""HiFT vocoder: mel spectrogram -> 22.05 kHz waveform (CosyVoice's HiFTGenerator, as Seed-VC uses it).

HiFT = a neural source-filter (NSF) excitation + an iSTFTNet decoder:

1. `F0Predictor` (upstream's ConvRNNF0Predictor, which has no RNN) reads f0 in Hz per mel frame.
2. `HarmonicSource` turns f0 into an excitation: the fundamental and `nb_harmonics` overtones as sines,
   gated by voicing, plus Gaussian noise, merged to one channel by Linear + tanh.
3. The decoder upsamples the mel with transposed convs, adds the excitation's STFT (down-sampled to each rate)
   after every upsampling, refines with Snake-activated residual blocks, and predicts a tiny STFT
   (n_fft 16, hop 4) whose inverse is the waveform.

Randomness is never drawn here: the NSF source consumes a `HiFTNoise` the caller drew from each stream's own
generator (parity README, section 7), so a batch of streams stays reproducible row by row.

Weights load from CosyVoice's `hift.pt` (weight norm stored as legacy `weight_g`/`weight_v`), folded into
plain conv weights once at load time.

Shapes: B batch, N mel frames, H+1 harmonics including the fundamental, L = N * samples_per_frame samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.model.checkpoints import CheckpointLayout, FoldWeightNorm, load_state
from app.model.precision import full_precision

# Snake's guard against alpha = 0 (upstream's value).
_SNAKE_EPS = 1e-9
# The predicted log-magnitude is exponentiated; upstream caps the magnitude here before the iSTFT.
_MAX_MAGNITUDE = 1e2
# float32(-pi) and float32(pi): the bounds of the NSF phases' Uniform(-pi, pi).
_PI32_LOW = float(torch.tensor(-math.pi, dtype=torch.float32))
_PI32_HIGH = float(torch.tensor(math.pi, dtype=torch.float32))

_HIFT_KEYS = {
    "in_channels",
    "base_channels",
    "nb_harmonics",
    "sampling_rate",
    "nsf_alpha",
    "nsf_sigma",
    "nsf_voiced_threshold",
    "upsample_rates",
    "upsample_kernel_sizes",
    "istft_params",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "source_resblock_kernel_sizes",
    "source_resblock_dilation_sizes",
    "lrelu_slope",
    "audio_limit",
}
_ISTFT_KEYS = {"n_fft": "istft_n_fft", "hop_len": "istft_hop"}
_F0_KEYS = {"in_channels": "f0_in_channels", "cond_channels": "f0_cond_channels", "num_class": None}


@dataclass(frozen=True)
class HiFTConfig:
    """The `hift` and `f0_predictor` sections of hift.yml. Defaults are CosyVoice-300M's (upstream's
    configs/hifigan.yml): the official hift.pt ships without a config, so these are the numbers it needs."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1  # sine amplitude; unvoiced noise std is nsf_alpha / 3
    nsf_sigma: float = 0.003  # noise std in voiced samples
    nsf_voiced_threshold: float = 10.0  # Hz; f0 above it is voiced
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    def __post_init__(self) -> None:
        stages = len(self.upsample_rates)
        if not stages == len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes):
            raise ValueError("upsample_rates, upsample_kernel_sizes and source_resblock_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.source_resblock_dilation_sizes):
            raise ValueError("source_resblock_kernel_sizes and source_resblock_dilation_sizes differ in length")

    @classmethod
    def from_yaml_dict(cls, data: Mapping[str, Any]) -> HiFTConfig:
        """Parse hift.yml; keys it leaves out keep the defaults, unknown keys are refused."""
        hift = dict(data.get("hift", {}))
        f0 = dict(data.get("f0_predictor", {}))
        _reject_unknown("hift", hift, _HIFT_KEYS)
        _reject_unknown("f0_predictor", f0, set(_F0_KEYS))
        istft = dict(hift.pop("istft_params", {}))
        _reject_unknown("hift.istft_params", istft, set(_ISTFT_KEYS))
        if f0.pop("num_class", 1) != 1:
            raise ValueError("hift.yml: f0_predictor.num_class must be 1 (one f0 value per frame)")

        values = {**hift, **{_ISTFT_KEYS[k]: v for k, v in istft.items()}}
        values |= {_F0_KEYS[k]: v for k, v in f0.items()}
        kinds = {f.name: str(f.type) for f in fields(cls)}  # postponed annotations: the type as written
        return cls(**{name: _coerce(kinds[name], value) for name, value in values.items()})

    def to_yaml_dict(self) -> dict[str, Any]:
        """The hift.yml sections that `from_yaml_dict` reads back to this config (used to write bundles)."""
        hift: dict[str, Any] = {name: _plain(getattr(self, name)) for name in sorted(_HIFT_KEYS - {"istft_params"})}
        hift["istft_params"] = {key: getattr(self, field) for key, field in _ISTFT_KEYS.items()}
        f0 = {key: getattr(self, field) for key, field in _F0_KEYS.items() if field is not None}
        return {"hift": hift, "f0_predictor": {"num_class": 1, **f0}}

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop


def _plain(value: Any) -> Any:
    """Tuples (nested too) as lists, the way YAML writes sequences."""
    return [_plain(item) for item in value] if isinstance(value, tuple) else value


def _reject_unknown(section: str, values: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"hift.yml: unknown key(s) {unknown} in section '{section}'; expected some of {sorted(known)}")


def _coerce(kind: str, value: Any) -> Any:
    """YAML gives lists and may give ints for floats; the frozen config wants tuples and exact types."""
    if kind == "tuple[tuple[int, ...], ...]":
        return tuple(tuple(int(d) for d in row) for row in value)
    if kind == "tuple[int, ...]":
        return tuple(int(v) for v in value)
    return {"int": int, "float": float}[kind](value)


@dataclass(frozen=True)
class HiFTNoise:
    """Per-row random draws the NSF source consumes (drawn by the caller from each stream's own generator)."""

    phase_u: Tensor  # (B, H+1, 1) raw U[0,1) uniforms
    sine_noise: Tensor  # (B, H+1, L) N(0,1)


class Snake(nn.Module):
    """x + sin(alpha * x)^2 / alpha, one learned frequency alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]  # (1, C, 1)
        return x + (1.0 / (alpha + _SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size - 1) * dilation // 2


class ResBlock(nn.Module):
    """Per dilation: x += conv2(snake(conv1(snake(x)))); conv1 is dilated, conv2 is not. Length-preserving."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Conv1d:
            return nn.Conv1d(
                channels,
                channels,
                kernel_size,
                dilation=dilation,
                padding=_same_padding(kernel_size, dilation),
            )

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Five conv3+ELU layers and a linear head; |output| is f0 in Hz per mel frame."""

    def __init__(self, in_channels: int, cond_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)  # convs at indices 0, 2, 4, 6, 8 as in hift.pt
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        hidden = self.condnet(mel).transpose(1, 2)  # (B, N, C)
        return self.classifier(hidden).squeeze(-1).abs()  # (B, N)


class HarmonicSource(nn.Module):
    """NSF excitation from sample-rate f0: sines at f0 * (1..H+1), voicing gate, noise, Linear + tanh."""

    # Registered buffers, declared so that they type as tensors rather than as Module.__getattr__'s union.
    multiples: Tensor

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        self.l_linear = nn.Linear(config.nb_harmonics + 1, 1)
        self.register_buffer(
            "multiples",
            torch.arange(1, config.nb_harmonics + 2, dtype=torch.float32)[None, :, None],
            persistent=False,
        )  # (1, H+1, 1)

    def forward(self, f0: Tensor, noise: HiFTNoise) -> Tensor:
        """f0 (B, 1, L) in Hz -> excitation (B, L, 1)."""
        cfg = self.config
        # Cycles advanced per sample by each harmonic.
        increments = f0 * self.multiples / cfg.sampling_rate  # (B, H+1, L)
        # The phase integrates ~16k increments. Upstream's float32 cumsum on CPU runs a float64 accumulator
        # and rounds each output; a float32 accumulator (e.g. CUDA's) drifts enough to move the waveform by
        # ~6e-2 (parity README, section 10), so accumulate in float64 explicitly on every device.
        cycles = torch.cumsum(increments.double(), dim=-1).float()
        theta = 2 * math.pi * (cycles % 1)

        # Uniform(-pi, pi) as torch.distributions evaluates it: float32 bounds, low + u * (high - low). The bounds
        # are Python floats holding the float32 values (their difference, 2 * float32(pi), is exact in float32), so
        # no tensor is made here: this method can be captured in a CUDA graph.
        phase = _PI32_LOW + noise.phase_u * (_PI32_HIGH - _PI32_LOW)  # (B, H+1, 1)
        # The fundamental always starts at phase 0; its uniform is drawn anyway to keep the stream in step.
        phase = torch.cat([torch.zeros_like(phase[:, :1]), phase[:, 1:]], dim=1)

        sines = cfg.nsf_alpha * torch.sin(theta + phase)
        voiced = (f0 > cfg.nsf_voiced_threshold).float()  # (B, 1, L)
        noise_amp = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
        excitation = sines * voiced + noise_amp * noise.sine_noise  # (B, H+1, L)
        return torch.tanh(self.l_linear(excitation.transpose(1, 2)))  # (B, L, 1)


class HiFTVocoder(nn.Module):
    """Mel (B, in_channels, N) -> waveform (B, N * samples_per_frame), clamped to +-audio_limit."""

    # Registered buffers, declared so that they type as tensors rather than as Module.__getattr__'s union.
    window: Tensor

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        base = config.base_channels
        n_bins = config.istft_n_fft + 2  # real and imaginary parts of n_fft // 2 + 1 bins
        stages = len(config.upsample_rates)
        widths = [base // 2 ** (i + 1) for i in range(stages)]

        self.m_source = HarmonicSource(config)
        self.conv_pre = nn.Conv1d(config.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, widths[i], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True))
        )
        # The source STFT runs at the final frame rate; stage i needs it down-sampled by the product of the
        # upsample rates that come after stage i.
        self.source_downs = nn.ModuleList()
        for i in range(stages):
            factor = math.prod(config.upsample_rates[i + 1 :])
            if factor == 1:
                self.source_downs.append(nn.Conv1d(n_bins, widths[i], 1))
            else:
                self.source_downs.append(nn.Conv1d(n_bins, widths[i], factor * 2, factor, padding=factor // 2))
        self.source_resblocks = nn.ModuleList(
            ResBlock(widths[i], k, d)
            for i, (k, d) in enumerate(
                zip(config.source_resblock_kernel_sizes, config.source_resblock_dilation_sizes, strict=True)
            )
        )
        self.resblocks = nn.ModuleList(
            ResBlock(widths[i], k, d)
            for i in range(stages)
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = nn.Conv1d(widths[-1], n_bins, 7, padding=3)
        self.f0_predictor = F0Predictor(config.f0_in_channels, config.f0_cond_channels)
        # Upstream uses scipy's periodic hann cast to float32. That equals torch's float64 window rounded to
        # float32; torch's own float32 window differs from it in the last bit.
        window = torch.hann_window(config.istft_n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("window", window, persistent=False)

    def predict_f0(self, mel: Tensor) -> Tensor:
        """(B, in_channels, N) -> f0 in Hz (B, N)."""
        return self.f0_predictor(mel)

    def harmonic_source(self, f0: Tensor, noise: HiFTNoise) -> Tensor:
        """Frame-rate f0 (B, N) -> excitation (B, L, 1)."""
        # Nearest-neighbour upsampling by an integer factor: each frame's f0 is held for a frame's samples.
        f0_samples = f0.repeat_interleave(self.config.samples_per_frame, dim=-1)[:, None]  # (B, 1, L)
        h1 = self.config.nb_harmonics + 1
        expected = (f0.shape[0], h1, f0_samples.shape[-1])
        assert noise.phase_u.shape == (*expected[:2], 1), (
            f"phase_u {tuple(noise.phase_u.shape)}, want {expected[:2]}+(1,)"
        )
        assert noise.sine_noise.shape == expected, f"sine_noise {tuple(noise.sine_noise.shape)}, want {expected}"
        return self.m_source(f0_samples, noise)

    def forward(self, mel: Tensor, noise: HiFTNoise, f0: Tensor | None = None) -> Tensor:
        """Mel (B, in_channels, N) -> waveform (B, L). A given f0 (B, N) in Hz bypasses the predictor."""
        return self.waveform(*self.spectrum(mel, noise, f0))

    def waveform(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        """The iSTFT of the predicted spectrum, clamped. Kept apart from `spectrum`: torch's iSTFT checks its
        window on the host, so it cannot be captured in a CUDA graph."""
        wave = self._istft(magnitude, phase)
        return wave.clamp(-self.config.audio_limit, self.config.audio_limit)

    def spectrum(self, mel: Tensor, noise: HiFTNoise, f0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mel (B, in_channels, N) -> the tiny STFT's magnitude and phase (float32), everything but the iSTFT."""
        cfg = self.config
        assert mel.dim() == 3 and mel.shape[1] == cfg.in_channels, (
            f"mel {tuple(mel.shape)}, want (B, {cfg.in_channels}, N)"
        )
        # f0 and the NSF source stay float32 in every precision: the source integrates f0 over the whole block,
        # so a reduced-precision f0 shifts the phase of every later sample (app/model/precision.py).
        with full_precision(mel.device):
            if f0 is None:
                f0 = self.predict_f0(mel.float())
            source = self.harmonic_source(f0.float(), noise).squeeze(-1)  # (B, L)
            source_spec = self._stft(source)  # (B, n_fft + 2, L / hop + 1)

        x = self.conv_pre(mel)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                # One extra leading frame so the frame count matches the centred source STFT (L / hop + 1).
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            stage_blocks = self.resblocks[i * n_kernels : (i + 1) * n_kernels]
            outputs = [block(x) for block in stage_blocks]
            x = sum(outputs[1:], start=outputs[0]) / n_kernels
        # Upstream's last activation uses leaky_relu's default slope (0.01), not lrelu_slope.
        x = self.conv_post(F.leaky_relu(x)).float()
        n_mag = cfg.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :n_mag]).clamp(max=_MAX_MAGNITUDE)
        phase = torch.sin(x[:, n_mag:])  # upstream squashes the phase with sin; kept for parity
        return magnitude, phase

    def _stft(self, signal: Tensor) -> Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop
        spec = torch.stft(signal, n_fft, hop, n_fft, window=self.window, center=True, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)  # (B, 2 * (n_fft // 2 + 1), frames)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop
        # torch.complex has no bfloat16/float16 kernels: under autocast the iSTFT runs in float32.
        magnitude, phase = magnitude.float(), phase.float()
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, hop, n_fft, window=self.window, center=True)

    @classmethod
    def from_state_dict(
        cls, config: HiFTConfig, state_dict: Mapping[str, Tensor], source: object = None
    ) -> HiFTVocoder:
        """Build from a CosyVoice hift.pt state dict (loaded strictly, weight norm folded); returns eval()."""
        model = cls(config)
        load_state(model, state_dict, HIFT_LAYOUT, source)
        return model.eval()


def is_weight_normed(name: str, module: nn.Module) -> bool:
    # CosyVoice weight-normalises every convolution except the source down-samplers.
    return isinstance(module, nn.Conv1d | nn.ConvTranspose1d) and not name.startswith("source_downs.")


# CosyVoice's hift.pt: our parameter names, with legacy weight norm on the convolutions.
HIFT_LAYOUT = CheckpointLayout("HiFT vocoder", hooks=(FoldWeightNorm(is_weight_normed),))
