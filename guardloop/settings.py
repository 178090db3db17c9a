"""All configuration in one class: environment variables (GUARDLOOP_*) over an optional YAML file over defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARDLOOP_", extra="forbid", validate_default=True)

    # Where the YAML file is read from (itself only settable from the environment: GUARDLOOP_CONFIG).
    config: Path | None = None

    # Storage
    data_dir: Path = Path("var")
    registry_dir: Path = Path("models/versions")

    # HTTP service
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_texts: int = Field(64, ge=1, description="most texts in one /classify request")
    max_text_chars: int = Field(4000, ge=1, description="most characters in one text")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above this are refused unread")
    admin_token: SecretStr | None = None

    # Inference
    onnx_threads: int = Field(1, ge=1, description="intra-op threads of the ONNX Runtime session")
    max_seq_len: int = Field(128, ge=8, le=512)
    batch_max_size: int = Field(32, ge=1, description="most texts the micro-batcher runs in one forward pass")
    batch_max_wait_ms: float = Field(2.0, ge=0, description="longest a text waits for others to join its batch")
    registry_poll_seconds: float = Field(5.0, gt=0, description="how often the service checks `current`")

    # Training
    seed: int = 13

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        import os

        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = os.environ.get("GUARDLOOP_CONFIG")
        if yaml_path:
            if not Path(yaml_path).is_file():
                raise ValueError(f"GUARDLOOP_CONFIG={yaml_path}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)

    @property
    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
