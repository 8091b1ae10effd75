"""Typed settings from environment variables (prefix ``SAM3_BATCH_``), built once at the entry point."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from sam3_batch.contracts.cpus import usable_cpus

ENV_PREFIX = "SAM3_BATCH_"
DEFAULT_MAX_IO_WORKERS = 4
_NOT_PREFIXED = {"aws_secret_access_key", "nvidia_visible_devices"}


class Settings(BaseSettings):
    """Everything configurable by environment; secrets are SecretStr so they never show in a repr."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Queue and job state (Redis). Passwords and rediss:// TLS URLs are supported here.
    broker_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    state_url: SecretStr | None = None  # job state Redis; defaults to broker_url
    queue: str = "sam3"
    visibility_timeout_s: int = Field(900, ge=10)  # see docs/deploy.md "Timeouts" for the arithmetic
    chunk_size: int = Field(32, ge=1, le=1000)
    queue_high_water: int = Field(2000, ge=1)  # chunks; producer pauses above this
    queue_low_water: int = Field(1000, ge=0)  # and resumes below this

    # Object storage (any S3-compatible store; credentials come from the standard AWS variables).
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_max_attempts: int = Field(8, ge=1)
    s3_retry_mode: Literal["standard", "adaptive"] = "adaptive"
    s3_connect_timeout_s: float = 10.0
    s3_read_timeout_s: float = 60.0

    # http(s) inputs
    http_allow_private: bool = False
    http_max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    http_timeout_s: float = Field(30.0, gt=0)

    # Images
    max_image_pixels: int = Field(120_000_000, ge=1)  # decompression-bomb cap

    # Model and inference
    model: str = "facebook/sam3"
    model_revision: str | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    require_gpu: bool = False  # refuse to start when no GPU is usable (set in the worker images' deployments)
    # autocast-bf16: float32 weights, bfloat16 compute, boxes and scores in float32 (README, "Running on GPUs")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "autocast-bf16"] = "auto"
    batch_size: int = Field(8, ge=0)  # images per model batch; 0: automatic (from free GPU memory)
    compile: bool = False  # refused at start-up where torch.compile cannot build kernels (no C compiler)
    compile_cache_dir: str | None = None  # inductor + Triton caches; default: under HF_HOME (the model volume)
    torch_threads: int = Field(0, ge=0)  # CPU threads of the model's process; 0: 4 on GPU, torch's default on CPU
    # Images whose full-size masks may wait in host RAM for a writer, per worker; 0: two batches' worth.
    max_pending_writes: int = Field(0, ge=0)
    # Download/decode/resize and encode/upload run beside the model in this many workers per stage:
    # processes by default (no GIL shared with the model), or threads of the worker process.
    io_mode: Literal["processes", "threads"] = "processes"
    # 0: one per CPU this worker may use (its affinity and container quota), at most 4 (``io_worker_count``).
    io_workers: int = Field(0, ge=0)
    # Shared-memory slots (one model input each, ~3 MB at 1008 px) that loader processes resize 8-bit pixels
    # into for the model; images beyond them cross the slower way. 0: none (worker.pixel_slots).
    pixel_slots: int = Field(64, ge=0)

    # Operations
    metrics_port: int | None = None  # also serves /healthz and /readyz
    log_json: bool = False
    progress_interval_s: float = Field(10.0, gt=0)  # off a terminal: one progress line this often
    finished_job_ttl_s: int = Field(14 * 86400, ge=0)  # job state in Redis expires after; 0 keeps it
    health_stale_s: float = Field(60.0, gt=0)  # /healthz fails when the consumer loop is silent this long
    health_chunk_limit_s: float = Field(600.0, gt=0)  # ... or one chunk has run longer than this
    task_retries: int = Field(3, ge=0)
    # Reaping on heartbeats: a dead worker's chunks go back on the queue within seconds (off: visibility
    # timeout only; the heartbeat itself, which `submit` reads for the workers' models, always runs).
    worker_heartbeat: bool = True

    # Read only so that redact() can mask it wherever it might appear; boto3 reads AWS_* itself.
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    # Set by the NVIDIA container runtime (and by users): a sign that this machine is meant to have a GPU.
    nvidia_visible_devices: str | None = Field(None, validation_alias="NVIDIA_VISIBLE_DEVICES")

    def secrets(self) -> list[str]:
        """Every secret value these settings know of (URL passwords, the AWS secret key)."""
        found = [urlsplit(u.get_secret_value()).password for u in (self.broker_url, self.state_url) if u]
        if self.aws_secret_access_key:
            found.append(self.aws_secret_access_key.get_secret_value())
        return [s for s in found if s]

    def as_env(self) -> dict[str, str]:
        """These settings as ``SAM3_BATCH_*`` variables, to start another process with exactly them."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None or name in _NOT_PREFIXED:  # read under their own names (boto3, NVIDIA runtime)
                continue
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"{ENV_PREFIX}{name.upper()}"] = str(raw).lower() if isinstance(raw, bool) else str(raw)
        return env

    def io_worker_count(self) -> int:
        """Loader workers, and as many writer workers: the setting, or one per usable CPU up to 4 (more stage
        processes than cores cost CPU per image without adding throughput: bench/RESULTS.md, "Host budget")."""
        return self.io_workers or min(DEFAULT_MAX_IO_WORKERS, usable_cpus())

    def state_redis_url(self) -> str:
        """The Redis URL for job state (falls back to the broker)."""
        chosen = self.state_url or self.broker_url
        return chosen.get_secret_value()


def load_settings() -> Settings:
    """Build settings from the environment; call once at an entry point and pass the object down."""
    return Settings()
