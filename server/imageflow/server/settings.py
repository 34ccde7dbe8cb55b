"""Settings from `IMAGEFLOW_*` environment variables (CLI flags mirror them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from imageflow.common.allocator import DEFAULT_MMAP_THRESHOLD
from imageflow.common.serving import EventLoop, known_log_level
from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the control plane can be told; defaults are the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="IMAGEFLOW_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 50051
    allow_insecure: bool = False
    """Serve a non-loopback address without authentication (trusted networks only)."""
    api_keys_file: Path | None = None
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_roles_claim: str = "roles"
    reflection: bool = True
    rate_limit_per_s: float = 0.0
    """Requests a second per caller (token bucket); 0 = no limit."""
    rate_limit_burst: int = 50
    max_executions_per_principal: int = 32
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tool_tls: bool = False
    """TLS to tool services and Triton (on by itself when a tool CA or client certificate is set)."""
    tool_tls_ca_file: Path | None = None
    tool_tls_cert_file: Path | None = None
    tool_tls_key_file: Path | None = None
    tool_allowlist: str = "127.0.0.0/8,::1,localhost"
    """Where RegisterTool and ImportTritonModels may point: IPs, CIDRs, host names, `*.suffix`, each with an
    optional `:port`; comma-separated."""
    database_url: str = "sqlite:///./imageflow.db"
    embedded_tools: bool = True
    embedded_in_process: bool = True
    chain_steps: bool = True
    tool_shared_memory: bool = False
    shm_sweep_age_s: float = 3600.0
    """With tool_shared_memory: /dev/shm/imageflow-* objects older than this are removed at start and every so often
    (left by a crash or an abandoned call; a frame lives for one execution); 0 never removes them."""
    triton_url: str | None = None
    triton_shared_memory: bool = False
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key_file: Path | None = None
    llm_timeout_s: float = 30.0
    llm_max_retries: int = 2
    llm_repair_rounds: int = 2
    llm_fallback: bool = True
    planner_mode: Literal["llm", "hybrid"] = "llm"
    kafka_bootstrap: str | None = None
    kafka_topic: str = "imageflow.execution-events"
    kafka_buffer_events: int = 10_000
    max_message_bytes: int = 64 * MIB
    tool_max_message_bytes: int = 512 * MIB
    tool_stream_bytes: int = 8 * MIB
    """Frames larger than this go to a tool service in pieces (ToolService.ProcessChainStream) instead of one message,
    so the control plane holds each once; 0 sends every frame in one message."""
    max_upload_bytes: int = 256 * MIB
    """The most bytes ExecutePipelineUpload accepts for all of one request's inputs together."""
    max_upload_bytes_in_flight: int = 1024 * MIB
    """The most bytes all ExecutePipelineUpload calls being received at once may hold."""
    upload_idle_s: float = 30.0
    """An upload with no message for this long is ended (DEADLINE_EXCEEDED)."""
    raw_intermediate_max_pixels: int = 16_000_000
    malloc_mmap_threshold: int = DEFAULT_MMAP_THRESHOLD
    """glibc: allocations up to this many bytes reuse heap memory instead of fresh mmaps (frames skip ~1,500 page
    faults per 1080p buffer; see imageflow.common.allocator); 0 keeps glibc's defaults."""
    max_pipeline_steps: int = 64
    max_steps_in_flight_per_execution: int = 8
    max_steps_in_flight: int = 64
    max_executions_in_flight: int = 64
    step_timeout_s: float = 60.0
    step_max_attempts: int = 3
    step_initial_backoff_s: float = 0.1
    step_max_backoff_s: float = 5.0
    grace_period_s: float = 5.0
    replica_lease_s: float = 10.0
    """Replicas on one database: an execution whose owner stays silent this long is marked interrupted by another."""
    output_retention_s: float = 7 * 24 * 3600.0
    """How long execution output images are kept (they are stored apart from the event log); 0 = forever."""
    model_repository: Path | None = None
    log_level: str = "info"
    event_loop: EventLoop = "auto"
    """The event loop the server runs on: uvloop where it is installed (auto), or as named (see
    imageflow.common.serving.loop_factory)."""

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        return known_log_level(value)

    @model_validator(mode="after")
    def _results_can_travel(self) -> Settings:
        if self.max_message_bytes < MIB:
            raise ValueError(
                f"IMAGEFLOW_MAX_MESSAGE_BYTES must be at least {MIB} (it is {self.max_message_bytes}): results and "
                "step events travel in messages of this size"
            )
        return self

    @model_validator(mode="after")
    def _uploads_can_happen(self) -> Settings:
        if self.upload_idle_s <= 0:
            raise ValueError(f"IMAGEFLOW_UPLOAD_IDLE_S must be positive (it is {self.upload_idle_s})")
        if self.max_upload_bytes > self.max_upload_bytes_in_flight:
            raise ValueError(
                f"IMAGEFLOW_MAX_UPLOAD_BYTES ({self.max_upload_bytes}) is over IMAGEFLOW_MAX_UPLOAD_BYTES_IN_FLIGHT "
                f"({self.max_upload_bytes_in_flight}): an upload of the largest size could never start"
            )
        return self

    @property
    def auth_configured(self) -> bool:
        """Whether callers must authenticate."""
        return bool(self.api_keys_file or self.jwks_file or self.jwks_url)

    @property
    def tool_tls_enabled(self) -> bool:
        """Whether channels to tools and Triton use TLS."""
        return self.tool_tls or bool(self.tool_tls_ca_file or self.tool_tls_cert_file)

    def read_llm_api_key(self) -> SecretStr | None:
        """The LLM key from the mounted secret file (never from the environment or a flag)."""
        if self.llm_api_key_file is None:
            return None
        return SecretStr(self.llm_api_key_file.read_text(encoding="utf-8").strip())
