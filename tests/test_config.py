"""Configs load from YAML and a bad value names its key."""
import pytest

from configs.schema import ConfigError, load_config


def test_default_config_loads():
    cfg = load_config()
    assert cfg.model.name == "efficientnet_lite0" and cfg.index.nprobe >= 1


@pytest.mark.parametrize(
    "yaml_text,key",
    [
        ("index:\n  nprobe: 0\n", "index.nprobe"),
        ("index:\n  nprobee: 4\n", "index.nprobee"),
        ("build:\n  min_actors: 3\n  max_actors: 1\n", "build"),
        ("model:\n  device: tpu\n", "model.device"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, key):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
