"""Settings (environment and `.env`), the active backends, and the four variant definitions.

Read once, by `main.py`'s lifespan or `worker.py`'s entry point: importing this module reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar, cast
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from errors import ConfigError

_B = TypeVar("_B", bound=str)

DEFAULT_REVE_PROMPT = (
    "Remove the background completely and keep only the jewellery piece. Do not change the piece in any way: "
    "keep its exact shape, design, metal colour and finish, every stone, prong, link, engraving and proportion "
    "exactly as photographed. No new reflections, no added shadows, no retouching."
)

DEFAULT_NANOBANA_PROMPT = (
    "Professional e-commerce product photograph of the jewellery piece in the reference image, which is already "
    "cut out on a transparent background. Place this exact piece in the scene described below. The piece must stay "
    "exactly as in the reference: same design, shape and proportions, same metal colour and finish, the same number, "
    "cut, colour and setting of every stone, every prong, link and engraving unchanged. Do not add, remove or "
    "restyle anything on the piece; do not add hands, people, packaging, text or logos. Photorealistic, sharp focus "
    "on the piece, natural contact shadow where it rests, square 1:1 frame, the piece centred and filling about "
    "two thirds of the frame."
)

DEFAULT_VARIANT_PROMPTS = (
    # Stone — Classic
    "Scene: the piece rests on a dark navy-blue sculpted stone surface with a fine matte grain, shot straight on at "
    "eye level (front-facing). Soft directional key light from the upper left through a large diffuser, gentle "
    "fill from the right, so the metal shows clean highlights and the stones sparkle without blown-out areas. Deep "
    "but readable shadows falling to the lower right; subtle reflection of the piece in the polished stone; calm, "
    "classic, timeless mood.",
    # Velvet — Boutique
    "Scene: the piece is displayed on a plush burgundy velvet cushion, camera at 45 degrees from the front left, "
    "slightly above. Warm golden key light from the upper right, like late-afternoon boutique lighting, with soft "
    "warm bokeh highlights in the out-of-focus background. Velvet pile visible with a gentle sheen; the piece sits "
    "naturally in the fabric with a soft contact shadow; luxurious, intimate boutique mood.",
    # Marble — Editorial
    "Scene: the piece lies on polished white Carrara marble with soft grey veining, photographed from above at "
    "about 30 degrees. Bright, even, diffused daylight as from a large north-facing window; crisp whites with no "
    "colour cast, a faint soft reflection of the piece in the marble and a light contact shadow; clean, airy, "
    "magazine-editorial mood.",
    # Charcoal — Dramatic
    "Scene: the piece stands against a deep charcoal gradient background, seen in side profile at about 60 "
    "degrees. A hard spotlight from directly above sculpts the piece with crisp highlights, and an amber rim light "
    "from behind traces its outline; the background falls off into near-black at the edges; bold, dramatic, "
    "high-contrast mood.",
)


@dataclass(frozen=True)
class VariantSpec:
    """One of the four styled shots. ``index`` is 1-4 and names the file ``<id>_v<index>.png``."""

    index: int
    key: str
    label: str
    prompt: str


VARIANT_KEYS = ("stone", "velvet", "marble", "charcoal")
VARIANT_LABELS = ("Stone — Classic", "Velvet — Boutique", "Marble — Editorial", "Charcoal — Dramatic")

@dataclass(frozen=True)
class Backends:
    """What the settings resolve to; logged at startup and reported by ``/health``."""

    database: Literal["sqlite", "supabase"]
    storage: Literal["local", "supabase"]
    background_remover: Literal["local", "reve"]
    variant_generator: Literal["local", "nanobana"]


class Settings(BaseSettings):
    """Every setting, named as the environment variable (upper-cased). See `.env.example`."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # The seed's settings: same names, same defaults.
    supabase_url: str | None = None
    supabase_service_role_key: SecretStr | None = None
    db_table_name: str = "products"
    raw_bucket_name: str = "plant-images"
    raw_storage_folder: str = "products"
    processed_bucket_name: str = "plant-images"
    processed_storage_folder: str = "products/processed"
    reve_api_key: SecretStr | None = None
    reve_prompt: str = DEFAULT_REVE_PROMPT
    nanobana_api_key: SecretStr | None = None
    nanobana_prompt: str = DEFAULT_NANOBANA_PROMPT
    nanobana_variant_prompt_1: str = DEFAULT_VARIANT_PROMPTS[0]
    nanobana_variant_prompt_2: str = DEFAULT_VARIANT_PROMPTS[1]
    nanobana_variant_prompt_3: str = DEFAULT_VARIANT_PROMPTS[2]
    nanobana_variant_prompt_4: str = DEFAULT_VARIANT_PROMPTS[3]
    environment: Literal["development", "staging", "production", "test"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_retries: int = Field(3, ge=0, le=10)
    processing_timeout_seconds: float = Field(300, gt=0)

    # Backends: "auto" picks the remote one when its credentials are set, else the embedded one.
    data_dir: Path = Path("./data")
    public_base_url: str = "http://localhost:8000"
    database_backend: Literal["auto", "sqlite", "supabase"] = "auto"
    storage_backend: Literal["auto", "local", "supabase"] = "auto"
    background_remover: Literal["auto", "local", "reve"] = "auto"
    variant_generator: Literal["auto", "local", "nanobana"] = "auto"

    # Providers.
    reve_base_url: str = "https://api.reve.com"
    reve_version: str = "latest"
    reve_timeout_seconds: float = Field(120, gt=0)
    reve_concurrency: int = Field(4, ge=1)
    nanobana_base_url: str = "https://api.nanobananaapi.ai"
    nanobana_callback_url: str | None = None
    nanobana_concurrency: int = Field(8, ge=1)
    nanobana_poll_interval_seconds: float = Field(3, gt=0)
    nanobana_deadline_seconds: float = Field(240, gt=0)
    http_timeout_seconds: float = Field(30, gt=0)
    retry_wait_max_seconds: float = Field(30, ge=0)
    max_download_bytes: int = Field(40 * 1024 * 1024, gt=0)
    studio_concurrency: int = Field(2, ge=1)

    # Uploads.
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_title_chars: int = Field(200, gt=0)

    # Worker.
    run_worker: bool = True
    worker_concurrency: int = Field(4, ge=1)
    job_max_attempts: int = Field(3, ge=1)
    job_lease_seconds: float = Field(60, ge=2)
    worker_poll_interval_seconds: float = Field(2, gt=0)
    shutdown_grace_seconds: float = Field(20, ge=0)

    # HTTP and access.
    cors_origins: Annotated[list[str], NoDecode] = ["*"]
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    allow_anonymous: bool = False
    rate_limit_per_minute: float = Field(30, ge=0)
    rate_limit_burst: int = Field(10, ge=1)

    @field_validator(
        "supabase_url", "supabase_service_role_key", "reve_api_key", "nanobana_api_key", "nanobana_callback_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `.env.example` copied as is leaves these as empty strings: that means "not configured".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_are_long(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < 16 for key in keys):
            raise ValueError("every API key must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return keys

    @field_validator("public_base_url", "reve_base_url", "nanobana_base_url", "supabase_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value

    @field_validator("reve_prompt")
    @classmethod
    def _reve_prompt_fits(cls, value: str) -> str:
        # Reve answers 400 PROMPT_TOO_LONG past 2560 characters: refuse it now, not on the first upload.
        if len(value) > 2560:
            raise ValueError(f"REVE_PROMPT is {len(value)} characters; Reve accepts at most 2560")
        return value

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    def variant_specs(self) -> tuple[VariantSpec, ...]:
        prompts = (
            self.nanobana_variant_prompt_1,
            self.nanobana_variant_prompt_2,
            self.nanobana_variant_prompt_3,
            self.nanobana_variant_prompt_4,
        )
        return tuple(
            VariantSpec(index=i + 1, key=key, label=label, prompt=f"{self.nanobana_prompt}\n\n{prompt}")
            for i, (key, label, prompt) in enumerate(zip(VARIANT_KEYS, VARIANT_LABELS, prompts, strict=True))
        )

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        secrets = (self.supabase_service_role_key, self.reve_api_key, self.nanobana_api_key, *self.api_keys)
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]

    def check_access(self) -> None:
        """Refuse to serve production uploads to anyone on the internet unless that is said explicitly."""
        if self.is_production and not self.api_keys and not self.allow_anonymous:
            raise ConfigError(
                "ENVIRONMENT=production with no API_KEYS: anyone could spend your provider credits. "
                "Set API_KEYS=<key>[,<key>…], or ALLOW_ANONYMOUS=true if a gateway in front already checks callers"
            )

    def resolve_backends(self) -> Backends:
        """Pick each backend, refusing half-configured ones with a message naming the missing variable."""
        has_url, has_key = bool(self.supabase_url), self.supabase_service_role_key is not None
        if has_url != has_key:
            missing = "SUPABASE_SERVICE_ROLE_KEY" if has_url else "SUPABASE_URL"
            raise ConfigError(f"Supabase is half-configured: {missing} is not set (set both or neither)")
        supabase = has_url and has_key
        for name, choice in (("DATABASE_BACKEND", self.database_backend), ("STORAGE_BACKEND", self.storage_backend)):
            if choice == "supabase" and not supabase:
                raise ConfigError(f"{name}=supabase needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        if self.background_remover == "reve" and self.reve_api_key is None:
            raise ConfigError("BACKGROUND_REMOVER=reve needs REVE_API_KEY")
        if self.variant_generator == "nanobana" and self.nanobana_api_key is None:
            raise ConfigError("VARIANT_GENERATOR=nanobana needs NANOBANA_API_KEY")

        backends = Backends(
            database=_pick(self.database_backend, "supabase" if supabase else "sqlite"),
            storage=_pick(self.storage_backend, "supabase" if supabase else "local"),
            background_remover=_pick(self.background_remover, "reve" if self.reve_api_key else "local"),
            variant_generator=_pick(self.variant_generator, "nanobana" if self.nanobana_api_key else "local"),
        )
        if backends.database == "supabase" and self.db_table_name != "products":
            raise ConfigError(
                f"DB_TABLE_NAME={self.db_table_name}: the SQL functions in migrations/ work on the table `products`; "
                "run the migrations with the name replaced, or keep the default"
            )
        return backends


def _pick(choice: str, auto: _B) -> _B:
    return auto if choice == "auto" else cast(_B, choice)
