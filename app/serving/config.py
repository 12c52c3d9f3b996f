"""Configuration of the serving layer, validated once (pydantic, unknown keys refused).

The same models back `serve_config.yaml`'s application args: a typo there fails at start-up with the field name,
instead of being silently ignored.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConverterConfig(Strict):
    model: str = Field("hub", description="'hub' (official files by hub id, cached) or a model bundle directory")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    max_sessions: int = Field(16, ge=1, le=1024, description="sessions one replica holds at most")
    voice_store: str = Field("./voices", description="local directory or fsspec URL of the voice store")
    voice_cache_size: int = Field(64, ge=1, description="prepared voices kept per replica")
    silence_gate_dbfs: float | None = Field(-55.0, description="skip the model below this level; null = off")
    deadline_min_steps: int | None = Field(
        None, ge=1, description="lower diffusion steps down to this when a step would miss its deadline; null = off"
    )
    deadline_fraction: float = Field(0.9, gt=0, le=1, description="share of the block time a step may take")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")
    identity: bool = Field(False, description="debug: return the input instead of converting (measures the path)")
    replica_tag: str = Field("local", description="set by the deployment: the replica's id")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class IngressConfig(Strict):
    voice_store: str = Field("./voices", description="local directory or fsspec URL of the voice store (shared)")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="key id -> API key; more come from the SEEDVC_API_KEYS env var (id=key,...)"
    )
    token_ttl_s: float = Field(900, gt=0, description="lifetime of a session token")
    max_backlog_blocks: int = Field(3, ge=1, description="pending input blocks per session before the oldest drops")
    retry_after_s: float = Field(5.0, gt=0, description="what a refused client is told to wait")
    opus_bitrate: int = Field(32000, ge=6000, le=256000, description="bit rate of the converted audio")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest voice upload")
    static_dir: str | None = Field(None, description="browser client files served at /; null = the bundled client/web")
