"""Configuration: YAML, env overrides (`GATEWAY_<SECTION>__<KEY>`), CLI overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ApiKeyConfig, ConfigError, UpstreamConfig, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_zero_setup_gateway() -> None:
    settings = load_settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.storage.url == "memory://"
    assert settings.storage.retention_seconds == 86400
    assert settings.upstreams == []


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = ROOT / "config.example.yaml"
    settings = load_settings(str(example))
    text = example.read_text()
    for section, model in (
        ("server", settings.server),
        ("storage", settings.storage),
        ("simulator", settings.simulator),
        ("auth", settings.auth),
        ("sse", settings.sse),
        ("runs", settings.runs),
        ("shutdown", settings.shutdown),
        ("idempotency", settings.idempotency),
    ):
        assert f"{section}:" in text
        for key in type(model).model_fields:
            assert f"{key}:" in text, f"{section}.{key} is not documented in config.example.yaml"
    for key in (*UpstreamConfig.model_fields, *ApiKeyConfig.model_fields):
        assert f"{key}:" in text


def test_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        "server:\n  host: 0.0.0.0\n  port: 9000\nstorage:\n  url: redis://localhost:6379/0\n  key_prefix: yaml\n",
    )
    monkeypatch.setenv("GATEWAY_STORAGE__KEY_PREFIX", "env")
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9100")
    settings = load_settings(path, server={"port": 9200})
    assert settings.server.host == "0.0.0.0"  # from the file
    assert settings.storage.url == "redis://localhost:6379/0"
    assert settings.storage.key_prefix == "env"  # env beats the file
    assert settings.server.port == 9200  # CLI beats env


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", write(tmp_path, "storage:\n  retention_seconds: 60\n"))
    assert load_settings().storage.retention_seconds == 60


def test_upstreams_from_yaml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        "upstreams:\n  - name: openai\n    kind: responses\n    base_url: https://api.openai.com/v1\n"
        "    api_key_env: MY_KEY\n    models: ['gpt-*']\n",
    )
    monkeypatch.setenv("MY_KEY", "sk-secret")
    settings = load_settings(path)
    spec = settings.upstreams[0].to_spec()
    assert (spec.name, spec.kind, spec.models, spec.api_key) == ("openai", "responses", ("gpt-*",), "sk-secret")
    monkeypatch.setenv("GATEWAY_UPSTREAMS", '[{"name": "local", "base_url": "http://127.0.0.1:8000/v1"}]')
    assert [u.name for u in load_settings(path).upstreams] == ["local"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server:\n  port: 99999\n", "server.port"),
        ("server:\n  portt: 1\n", "server.portt"),
        ("storage:\n  url: mysql://x\n", "storage.url"),
        ("storage:\n  retention_seconds: 0\n", "storage.retention_seconds"),
        ("upstreams:\n  - name: a\n", "upstreams.0.base_url"),
        ("upstreams:\n  - name: a\n    base_url: x\n    kind: grpc\n", "upstreams.0.kind"),
        ("upstreams:\n  - {name: a, base_url: x}\n  - {name: a, base_url: y}\n", "upstreams"),
        ("nonsense: 1\n", "nonsense"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"{key}:")
    assert "\n" not in message


def test_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"^server\.port:"):
        load_settings()


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "server: [unclosed\n"))
    assert "not valid YAML" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_upstream_headers_are_sent_but_may_not_carry_credentials() -> None:
    upstream = {"name": "a", "base_url": "http://x/v1", "headers": {"X-Title": "gateway"}}
    assert load_settings(upstreams=[upstream]).upstreams[0].to_spec().extra_headers == {"X-Title": "gateway"}
    with pytest.raises(ConfigError, match=r"^upstreams\.0\.headers: .*api_key_env"):
        load_settings(upstreams=[{**upstream, "headers": {"Authorization": "Bearer sk-x"}}])
