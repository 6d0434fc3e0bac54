import pytest

import sparse_unsloth as su
from sparse_unsloth.config import ConfigError, load_config


def test_presets_load_and_match_the_paper_math10k_layers():
    assert {"llama3-8b-math10k", "llama3-8b-csr", "smollm2-135m"} <= set(su.preset_names())
    cfg = load_config("llama3-8b-math10k")
    assert cfg.sparse_layers("mlp") == list(range(3, 31))
    assert cfg.sparse_layers("self_attn") == [14, 15, 16, 17, 18, 19, 21, 22, 23, 25, 26, 27, 28, 29]
    assert cfg.sparsity("mlp", 3) == 0.99 and cfg.sparsity("mlp", 31) == 0.0
    for name in su.preset_names():
        load_config(name)


def test_yaml_file_and_all_layers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("estimator_rank: 4\ndense_warmup_steps: 3\nsparsity:\n  mlp: {all: 0.5}\n")
    cfg = load_config(path, num_layers=4)
    assert cfg.mlp == {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5} and cfg.warmup_steps(100) == 3
    assert load_config(cfg.to_dict() | {"sparsity": {"mlp": {"0-3": 0.5}}}) == cfg


@pytest.mark.parametrize("text,message", [
    ("sparsity:\n  mlp: {3: 1.0}\n", r"sparsity 1.0 is outside \[0, 1\)"),
    ("sparsity:\n  mlp: {3: -0.1}\n", r"outside \[0, 1\)"),
    ("sparsity:\n  mlpp: {3: 0.5}\n", "unknown module kind.*'mlpp'.*use 'mlp' and 'self_attn'"),
    ("sparsty: {}\n", "unknown config key.*'sparsty'"),
    ("sparsity:\n  mlp: {'5-2': 0.5}\n", "layer key '5-2'"),
    ("sparsity:\n  mlp: {'x': 0.5}\n", "layer key 'x'"),
    ("sparsity:\n  mlp: {'1-3': 0.5, 2: 0.1}\n", "layer 2 is listed twice"),
    ("estimator_rank: 0\n", "estimator_rank must be an integer >= 1"),
    ("dense_warmup_ratio: 1.5\n", r"dense_warmup_ratio must be a number in \[0, 1\)"),
    ("dense_output_tokens: 3\n", "dense_output_tokens must be true or false"),
    ("[1, 2]\n", "must be a mapping"),
    ("sparsity:\n  mlp: {all: 0.5}\n", "'all' needs the model's layer count"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets are"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("missing/config.yaml")


def test_layers_beyond_the_depth_are_refused_for_every_source(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("sparsity:\n  mlp: {'2-5': 0.5}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: .*sparsity.mlp layer\(s\) \[4, 5\] sparse, but the model has "
                                          r"4 decoder layers \(0-3\)"):
        load_config(path, num_layers=4)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] sparse"):
        load_config({"sparsity": {"self_attn": {"4": 0.5}}}, num_layers=4)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[9\] sparse"):
        load_config(su.SparseConfig(mlp={9: 0.5}), num_layers=4)
    assert load_config(path, num_layers=6).sparse_layers("mlp") == [2, 3, 4, 5]
    assert load_config(path).sparse_layers("mlp") == [2, 3, 4, 5]          # no depth given: not checked

