"""Config tree: YAML presets, dotted overrides, resolution and one-line validation errors."""
from pathlib import Path

import pytest

from jaxllm.config import config_from_dict, load_config, parse_override, to_yaml
from jaxllm.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_resolve_derived_fields():
    m = config_from_dict({}).model
    assert m.attention.n_kv_head == m.attention.n_head
    assert m.attention.head_dim == m.d_model // m.attention.n_head
    assert m.mlp.d_ff == 4 * m.d_model


def test_swiglu_default_width_is_llama_rounding():
    m = config_from_dict({"model": {"d_model": 1024, "attention": {"n_head": 16}, "mlp": {"kind": "swiglu"}}}).model
    assert m.mlp.d_ff == 2816  # 8/3 * 1024 = 2730.67 -> next multiple of 256


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_loads_and_round_trips_through_yaml(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    out.write_text(to_yaml(cfg))
    assert load_config(out) == cfg


def test_dotted_overrides_with_yaml_typed_values(tmp_path):
    # (a dense LM preset: trm-maze, the last file, refuses attention windows)
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny-gpt.yaml",
                      ["model.n_layer=4", "model.attention.window=16", "model.norm.eps=1e-6",
                       "model.tie_embeddings=false", "model.position.kind=rope"])
    m = cfg.model
    assert (m.n_layer, m.attention.window, m.norm.eps, m.tie_embeddings, m.position.kind) == (4, 16, 1e-6, False, "rope")
    assert isinstance(m.norm.eps, float)


def test_override_can_reset_to_null():
    assert config_from_dict({"model": {"attention": {"window": 8}}}, ["model.attention.window=null"]).model.attention.window is None


def test_parse_override():
    assert parse_override("model.n_layer=4") == ("model.n_layer", 4)
    assert parse_override("model.position.kind=rope") == ("model.position.kind", "rope")


@pytest.mark.parametrize("overrides, field", [
    (["model.d_model=100", "model.attention.n_head=3"], "model.attention.n_head"),   # heads do not divide width
    (["model.attention.n_head=6", "model.attention.n_kv_head=4"], "model.attention.n_kv_head"),
    (["model.attention.window=0"], "model.attention.window"),
    (["model.attention.windw=4"], "'model.attention.windw'"),                       # unknown field
    (["model.n_layer=two"], "model.n_layer"),                                        # wrong type
    (["model.n_layer=2.5"], "model.n_layer"),
    (["model.tie_embeddings=3"], "model.tie_embeddings"),
    (["model.position.kind=alibi"], "model.position.kind"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.layerdrop=-0.1"], "model.layerdrop"),
    (["model.position.kind=rope", "model.attention.head_dim=7"], "model.attention.head_dim"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["train.seq_len=100000"], "train.seq_len"),
    (["model.n_layer.x=1"], "model.n_layer"),                                       # not a section
    (["n_layer"], "n_layer"),                                                        # not key=value
    (["bogus=1"], "'bogus'"),
])
def test_impossible_configs_get_one_line_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  attention: {n_head: 5}\n")
    with pytest.raises(ConfigError, match="bad.yaml: model.attention.n_head=5"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("mesh, message", [("dat:2", "bad entry 'dat:2'"), ("data:x", "not an integer"),
                                           ("data:-1,fsdp:-1", "at most one axis"), ("data:0", ">= 1 or -1"),
                                           ("data:2,data:2", "each once")])
def test_train_mesh_syntax_and_axis_names_are_checked_when_the_config_loads(mesh, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict({"train": {"mesh": mesh}})
    assert "\n" not in str(e.value)


def test_train_mesh_device_arithmetic_waits_for_the_run():
    assert config_from_dict({"train": {"mesh": "data:3,tensor:5"}}).train.mesh == "data:3,tensor:5"
