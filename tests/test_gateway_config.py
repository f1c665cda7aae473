"""Gateway options: safe defaults, TOML, environment, channel name rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tidegate.gateway.config import (
    ChannelOptions,
    ConfigError,
    GatewayConfig,
    example_config,
    load_config,
    origin_allowed,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_safe_ones() -> None:
    cfg = GatewayConfig()
    assert cfg.allow_anonymous is False and cfg.token_hmac_secret == "" and cfg.api_key == ""
    assert (cfg.port, cfg.tcp_port, cfg.metrics_port) == (8000, 8001, 9100)
    assert (cfg.ping_interval_s, cfg.pong_timeout_s) == (25.0, 8.0)
    opts = cfg.channels
    for f in dataclasses.fields(ChannelOptions):
        value = getattr(opts, f.name)
        assert not value, f"{f.name} should be off by default"
    assert cfg.namespaces == {} and cfg.allowed_origins == ()


def test_every_option_has_a_default() -> None:
    for cls in (GatewayConfig, ChannelOptions):
        for f in dataclasses.fields(cls):
            assert (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            ), f.name


def test_channel_namespaces() -> None:
    chat = ChannelOptions(join_leave=True)
    cfg = GatewayConfig(namespaces={"chat": chat})
    assert cfg.channel_options("chat:room1") is chat
    assert cfg.channel_options("room1") is cfg.channels
    assert cfg.channel_options("$chat:secret") is chat
    assert cfg.channel_options("$plain") is cfg.channels
    assert cfg.channel_options("nope:room") is None
    assert cfg.channel_options("chat:a:b") is chat
    assert cfg.is_private("$chat:secret") and not cfg.is_private("chat:x")


def test_example_toml_is_example_config() -> None:
    assert load_config(ROOT / "config" / "example.toml", env={}) == example_config()
    ex = example_config()
    assert ex.channels.allow_subscribe_for_client and ex.channels.allow_publish_for_client
    assert ex.channels.history_size == 100 and ex.channels.history_ttl_s == 300
    assert ex.namespaces["chat"].join_leave and not ex.allow_anonymous
    assert "dev" in ex.token_hmac_secret and "dev" in ex.api_key


def test_toml_and_env(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text(
        """
[gateway]
port = 9000
token_hmac_secret = "file"
allowed_origins = ["https://*.example.com"]
ping_interval_s = 20
[gateway.channels]
allow_subscribe_for_client = true
history_size = 5
history_ttl_s = 60
[gateway.namespaces.feed]
presence = true
"""
    )
    cfg = load_config(p, env={})
    assert cfg.port == 9000 and cfg.token_hmac_secret == "file" and cfg.ping_interval_s == 20.0
    assert cfg.channels.history_enabled and cfg.namespaces["feed"].presence
    env = {
        "TIDEGATE_PORT": "7000",
        "TIDEGATE_TCP_PORT": "7001",
        "TIDEGATE_METRICS_PORT": "7002",
        "TIDEGATE_TOKEN_HMAC_SECRET": "env",
        "TIDEGATE_API_KEY": "k",
        "TIDEGATE_ALLOW_ANONYMOUS": "yes",
    }
    cfg = load_config(p, env=env)
    assert (cfg.port, cfg.tcp_port, cfg.metrics_port) == (7000, 7001, 7002)
    assert cfg.token_hmac_secret == "env" and cfg.api_key == "k" and cfg.allow_anonymous
    assert load_config(env={"TIDEGATE_ALLOW_ANONYMOUS": "0"}).allow_anonymous is False


def test_top_level_layout_ignores_other_components(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text("port = 8100\nengine_workers = 4\n[channels]\npresence = true\n")
    cfg = load_config(p, env={})
    assert cfg.port == 8100 and cfg.channels.presence


@pytest.mark.parametrize(
    "text",
    [
        "[gateway]\nnope = 1\n",
        "[gateway]\nport = 'x'\n",
        "[gateway]\nallow_anonymous = 1\n",
        "[gateway.channels]\nbogus = true\n",
        "[gateway.namespaces.chat]\nhistory_size = 'big'\n",
        "[gateway.namespaces.'bad name']\npresence = true\n",
        "[gateway]\nping_interval_s = 5\npong_timeout_s = 8\n",
        "[gateway]\nport = 70000\n",
        "[gateway]\nallowed_origins = 'x'\n",
        "[gateway\n",
    ],
)
def test_bad_files(tmp_path: Path, text: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_config(p, env={})


@pytest.mark.parametrize(
    "env", [{"TIDEGATE_PORT": "eighty"}, {"TIDEGATE_ALLOW_ANONYMOUS": "maybe"}]
)
def test_bad_env(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_config(env=env)


def test_origins() -> None:
    pats = ("https://app.example.com", "https://*.example.org", "http://localhost:*")
    assert origin_allowed(None, pats) and origin_allowed("", ())
    assert origin_allowed("https://app.example.com", pats)
    assert origin_allowed("HTTPS://APP.EXAMPLE.COM", pats)
    assert origin_allowed("https://a.example.org", pats)
    assert origin_allowed("http://localhost:3000", pats)
    assert not origin_allowed("https://evil.com", pats)
    assert not origin_allowed("https://example.org.evil.com", pats)
    assert not origin_allowed("https://app.example.com.evil.com", pats)
    assert not origin_allowed("https://x.com", ())
    assert origin_allowed("https://x.com", ("*",))
