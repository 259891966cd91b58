from pathlib import Path

import pytest

from veil.errors import ConfigError
from veil.settings import load_settings


def test_defaults_come_from_the_shipped_yaml() -> None:
    s = load_settings(environ={})
    assert (s.edge.port, s.core.port) == (8000, 8001)
    assert s.edge.core_url == "http://127.0.0.1:8001"


def test_env_overrides_yaml_and_is_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "v.yaml"
    cfg.write_text("edge:\n  port: 9100\ncore:\n  max_sessions: 3\n")
    s = load_settings(cfg, environ={"VEIL_EDGE_PORT": "9200", "VEIL_CORE_SESSION_IDLE_SECONDS": "7",
                                    "VEIL_HOME": str(tmp_path)})
    assert s.edge.port == 9200 and s.core.max_sessions == 3 and s.core.session_idle_seconds == 7
    assert s.core_bundle_dir() == tmp_path / "bundles" / s.model.name / "core"


@pytest.mark.parametrize("env, needle", [
    ({"VEIL_EDGE_PORT": "eighty"}, "edge.port must be a int"),
    ({"VEIL_CORE_DEVICE": "tpu"}, "core.device"),
    ({"VEIL_CORE_MAX_SESSIONS": "0"}, "max_sessions"),
    ({"VEIL_CORE_BATCH_GROUPS": "0"}, "core.batch_groups must be in"),
])
def test_bad_values_fail_with_the_setting_named(env: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(environ=env)


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "v.yaml"
    cfg.write_text("edge:\n  prot: 1\n")
    with pytest.raises(ConfigError, match="unknown setting edge.prot"):
        load_settings(cfg, environ={})


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"VEIL_CONFIG": str(tmp_path / "nope.yaml")})


def test_core_url_alias_and_canonical_name_wins() -> None:
    assert load_settings(environ={"VEIL_CORE_URL": "http://core:8001"}).edge.core_url == "http://core:8001"
    both = {"VEIL_CORE_URL": "http://a:1", "VEIL_EDGE_CORE_URL": "http://b:2"}
    assert load_settings(environ=both).edge.core_url == "http://b:2"
