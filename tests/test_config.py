import re

import pytest

from tiedlora import PRESETS, Part, TiedLoraConfig, TiedLoraError

# Table 1 of the paper as SPEC.md states it: (tied, trained, init) of A, B, u, v.
T, F = True, False
TABLE_1 = {
    "lora": [(F, T, "kaiming"), (F, T, "zeros"), (F, F, "ones"), (F, F, "ones")],
    "vera": [(T, F, "kaiming"), (T, F, "kaiming"), (F, T, "ones"), (F, T, "zeros")],
    "tl1": [(T, T, "kaiming"), (T, F, "kaiming"), (F, F, "ones"), (F, F, "ones")],
    "tl2": [(T, T, "kaiming"), (T, F, "kaiming"), (F, T, "ones"), (F, T, "zeros")],
    "tl3": [(T, F, "kaiming"), (T, T, "zeros"), (F, F, "ones"), (F, F, "ones")],
    "tl4": [(T, F, "kaiming"), (T, T, "zeros"), (F, T, "ones"), (F, F, "ones")],
    "tl5": [(T, T, "kaiming"), (T, T, "zeros"), (F, F, "ones"), (F, F, "ones")],
    "tl6": [(T, T, "kaiming"), (T, T, "kaiming"), (F, T, "ones"), (F, T, "zeros")],
}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_presets_are_table_1(name):
    cfg = TiedLoraConfig.preset(name, rank=4)
    got = [(p.tied, p.trainable, p.init) for p in (cfg.A, cfg.B, cfg.u, cfg.v)]
    assert got == TABLE_1[name]
    assert cfg.rank == 4 and cfg.scale == 1.0 and cfg.name == name


def test_exactly_eight_presets():
    assert sorted(PRESETS) == sorted(TABLE_1)


def test_tl1_zero_start_override():
    cfg = TiedLoraConfig.preset("tl1", rank=8, init={"A": "zeros"})
    assert cfg.A == Part(tied=True, trainable=True, init="zeros") and cfg.B.init == "kaiming"


def test_free_combination_and_alpha():
    cfg = TiedLoraConfig(
        rank=4,
        alpha=16,
        A=Part(tied=True, trainable=False),
        B=Part(tied=False, init="zeros"),
        u=Part(tied=True, trainable=True, init=0.1),
        v=Part(trainable=False, init="ones"),
        layers=[3, 1, 3],
    )
    assert cfg.scale == 4.0 and cfg.layers == (1, 3)


def test_dict_round_trip():
    cfg = TiedLoraConfig.preset(
        "tl6", rank=16, seed=7, layers=[2], targets={"qkv": ["attn.q", "attn.k"]}, init={"u": 0.5}
    )
    assert TiedLoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rank": 8, "rnak": 4}, "Unknown config keys \\['rnak'\\]"),
        ({"rank": 8, "A": {"tied": True, "trainable": True, "init": "kaiming", "x": 1}}, "Config part A="),
        ({"rank": "8"}, "rank='8' must be a positive integer"),
        ({"rank": 8, "A": {"tied": "yes"}}, "both must be True or False"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_from_dict_rejects_bad_input(data, message):
    with pytest.raises(TiedLoraError, match=message):
        TiedLoraConfig.from_dict(data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank=0 must be a positive integer"),
        (dict(rank=-3), "rank=-3 must be a positive integer"),
        (dict(rank=True), "rank=True must be a positive integer"),
        (dict(alpha=0), "alpha=0 must be a positive number"),
        (dict(dropout=1.0), "dropout=1.0 must be in"),
        (dict(layers=[]), "layers=\\[\\] must be a non-empty list"),
        (dict(layers=[-1]), "must be a non-empty list of layer indices"),
        (dict(targets=["attention"]), "use groups from"),
        # found by the fuzzers of test_reliability.py: each crashed later, or was accepted
        (dict(layers=3), "layers=3 must be a list of layer indices"),
        (dict(layers=False), "layers=False must be a list of layer indices"),
        (dict(alpha=float("nan")), "alpha=nan must be a positive number"),
        (dict(alpha=float("inf")), "alpha=inf must be a positive number"),
        (dict(name=5), "name=5 must be a string"),
        (dict(seed=2**63), "seed=9223372036854775808 must be an integer from 0 to 2\\*\\*32 - 1"),
        (dict(targets=5), "targets=5: use a list of groups"),
    ],
)
def test_config_errors_name_the_input(kwargs, message):
    with pytest.raises(TiedLoraError, match=message):
        TiedLoraConfig(**kwargs)


@pytest.mark.parametrize("init", ["normal", float("nan"), float("inf"), True, 1e308, -1e39])
def test_part_errors(init):
    with pytest.raises(TiedLoraError, match=re.escape(f"init={init!r} is not an initialisation")):
        Part(init=init)
    with pytest.raises(TiedLoraError, match="A='x' must be a tiedlora.Part"):
        TiedLoraConfig(A="x")


def test_unknown_preset():
    with pytest.raises(TiedLoraError, match="Unknown preset 'tl7': choose one of lora, vera, tl1"):
        TiedLoraConfig.preset("tl7")
    with pytest.raises(TiedLoraError, match="init names part 'C'"):
        TiedLoraConfig.preset("tl6", init={"C": "zeros"})
