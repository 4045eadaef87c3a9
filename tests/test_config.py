"""Settings: defaults, backend resolution, refusal of half-configured backends, and .env.example kept complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import Settings
from errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)


def test_seed_defaults_are_kept() -> None:
    s = settings()
    assert (s.db_table_name, s.raw_bucket_name, s.raw_storage_folder) == ("products", "plant-images", "products")
    assert (s.processed_bucket_name, s.processed_storage_folder) == ("plant-images", "products/processed")
    assert (s.environment, s.log_level, s.max_retries, s.processing_timeout_seconds) == ("development", "INFO", 3, 300)


def test_nothing_configured_is_fully_embedded() -> None:
    b = settings().resolve_backends()
    assert (b.database, b.storage, b.background_remover, b.variant_generator) == ("sqlite", "local", "local", "local")


def test_credentials_switch_auto_backends_to_remote() -> None:
    b = settings(supabase_url="https://x.supabase.co", supabase_service_role_key="k", reve_api_key="papi.k",
                 nanobana_api_key="n").resolve_backends()
    assert (b.database, b.storage, b.background_remover, b.variant_generator) == ("supabase", "supabase", "reve",
                                                                                  "nanobana")
    mixed = settings(reve_api_key="papi.k", variant_generator="local").resolve_backends()
    assert (mixed.background_remover, mixed.variant_generator) == ("reve", "local")


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"supabase_url": "https://x.supabase.co"}, "SUPABASE_SERVICE_ROLE_KEY"),
        ({"supabase_service_role_key": "k"}, "SUPABASE_URL"),
        ({"database_backend": "supabase"}, "SUPABASE_URL"),
        ({"storage_backend": "supabase"}, "SUPABASE_URL"),
        ({"background_remover": "reve"}, "REVE_API_KEY"),
        ({"variant_generator": "nanobana"}, "NANOBANA_API_KEY"),
    ],
)
def test_half_configured_backends_are_refused_by_name(values: dict[str, object], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        settings(**values).resolve_backends()


def test_nonsense_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="http"):
        settings(reve_base_url="ftp://reve")
    with pytest.raises(ValueError):
        settings(worker_concurrency=0)
    with pytest.raises(ValueError):
        settings(database_backend="mysql")


def test_cors_origins_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://shop.example, https://admin.example")
    assert Settings(_env_file=None).cors_origins == ["https://shop.example", "https://admin.example"]


def test_variant_prompts_follow_the_brief() -> None:
    specs = settings(nanobana_variant_prompt_3="Custom marble").variant_specs()
    assert [s.label for s in specs] == ["Stone — Classic", "Velvet — Boutique", "Marble — Editorial",
                                        "Charcoal — Dramatic"]
    assert specs[2].prompt.endswith("Custom marble")
    default = settings().variant_specs()
    for spec, words in zip(default, (("navy", "upper left"), ("burgundy", "45", "upper right", "bokeh"),
                                     ("Carrara", "30 degrees", "daylight"), ("charcoal", "60", "amber rim")),
                           strict=True):
        assert all(word.lower() in spec.prompt.lower() for word in words), spec.key
        assert "exactly" in spec.prompt  # every brief insists the piece stays as photographed


def test_env_example_lists_every_setting_and_loads_as_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields <= listed, f"missing from .env.example: {sorted(fields - listed)}"
    (tmp_path / ".env").write_text(example)
    monkeypatch.chdir(tmp_path)
    assert Settings().resolve_backends().database == "sqlite"
