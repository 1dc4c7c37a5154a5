import argparse

import pytest

from config import PRESETS, add_model_args, config_from_args, get_config


def test_presets_and_overrides():
    cfg = get_config("smollm2-135m", n_layer=2)
    assert cfg.n_layer == 2 and cfg.d_model == 576 and cfg.rope_theta == 100000.0
    assert get_config("tiny").n_layer == PRESETS["tiny"].n_layer


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as err:
        get_config("gpt5")
    for name in PRESETS:
        assert name in str(err.value)


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        get_config("tiny", n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("tiny", n_layers=3)


def test_cli_overrides():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--preset", "slm-40m", "--n-layer", "6", "--no-tie-embeddings", "--rope-theta", "5e5"])
    cfg = config_from_args(args)
    assert (cfg.n_layer, cfg.tie_embeddings, cfg.rope_theta, cfg.d_model) == (6, False, 5e5, 640)
