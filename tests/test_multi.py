"""Mixed-adapter batches: every row's output equals its adapter applied alone."""

import json

import pytest
import torch

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.multi import MultiAdapterModel

from conftest import randomize, tiny_model

ADAPTERS = {  # name -> config: tied and untied, different ranks, a layer subset, alpha != rank
    "tl6": TiedLoraConfig.preset("tl6", rank=4, seed=1),
    "lora": TiedLoraConfig.preset("lora", rank=2, alpha=6, layers=[1]),
    "vera": TiedLoraConfig.preset("vera", rank=8, seed=2),
    "tl2": TiedLoraConfig.preset("tl2", rank=3),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model = randomize(tiedlora.apply(tiny_model("llama"), cfg), seed=i, trainable_only=True)
        tiedlora.save(model, root / name)
    return root


def alone(name, saved, tokens):
    with torch.no_grad():
        if name is None:
            return tiny_model("llama")(tokens).logits
        return tiedlora.load(tiny_model("llama"), saved / name)(tokens).logits


def test_each_row_equals_its_adapter_alone(saved):
    multi = MultiAdapterModel(tiny_model("llama"))
    ids = {name: multi.add(name, saved / name) for name in ADAPTERS}
    assert list(ids.values()) == [1, 2, 3, 4]
    tokens = torch.randint(0, 128, (6, 10), generator=torch.Generator().manual_seed(3))
    rows = [None, "tl6", "lora", "vera", "tl2", "tl6"]
    with torch.no_grad():
        mixed = multi(tokens, adapter_ids=[0 if r is None else ids[r] for r in rows]).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(name, saved, tokens)[i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(multi(tokens).logits, alone(None, saved, tokens))  # no ids: the base model exactly


def test_generate_per_row_and_unload_at_run_time(saved):
    multi = MultiAdapterModel(tiny_model("llama"))
    for name in ADAPTERS:
        multi.add(name, saved / name)
    tokens = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    out = multi.generate(
        tokens, adapter_ids=[multi.id_of("vera"), 0, multi.id_of("tl6")], max_new_tokens=5, do_sample=False
    )
    for row, name in zip(out, ["vera", None, "tl6"]):
        model = tiny_model("llama") if name is None else tiedlora.load(tiny_model("llama"), saved / name)
        i = ["vera", None, "tl6"].index(name)
        expected = model.generate(tokens[i : i + 1], max_new_tokens=5, do_sample=False)[0]
        assert torch.equal(row, expected)
    vera = multi.id_of("vera")
    multi.remove("vera")
    with pytest.raises(TiedLoraError, match="each 0 \\(none\\) or a loaded adapter's id"):
        multi(tokens, adapter_ids=[vera, 0, 0])
    assert multi.add("vera-again", saved / "vera") == vera  # the freed slot is reused
    with torch.no_grad():
        torch.testing.assert_close(
            multi(tokens, adapter_ids=[vera] * 3).logits, alone("vera", saved, tokens), rtol=1e-5, atol=1e-5
        )


def test_tied_tensors_are_stored_once_per_adapter(saved):
    multi = MultiAdapterModel(tiny_model("llama"))
    multi.add("tl6", saved / "tl6")
    multi.add("lora", saved / "lora")
    bank = multi.bank("qkv")
    assert bank.top == {"A": 1 + 1 + 1, "B": 3, "slot": 3}  # nothing, tl6's one tied A, lora's A for its one layer
    assert bank.A.shape[1] == 8  # ranks 4 and 2 share the bucket of ranks up to 8


def test_loading_an_adapter_writes_its_own_rows_and_restacks_nothing(saved):
    """A server with 1,000 adapters resident loads one more at the cost of one: the stacks are
    reallocated only when they double (about log2(n) times in n loads), and no other adapter's
    rows are rewritten."""
    multi = MultiAdapterModel(tiny_model("llama"))
    multi.add("first", saved / "tl6")
    bank = multi.bank("qkv")  # every adapter here is of rank 8 or less: one bank
    moves = 0
    for i in range(200):
        before = bank.A.data_ptr(), bank.u.data_ptr()
        multi.add(f"a{i}", saved / ["tl6", "lora", "vera", "tl2"][i % 4])
        moves += (bank.A.data_ptr(), bank.u.data_ptr()) != before
    assert moves <= 2 * 9  # A and u double about log2(200) times each, never once per load
    snapshot = {name: getattr(bank, name).clone() for name in ("A", "B", "u", "v", "a_index", "b_index")}
    multi.remove("a7")
    multi.add("new", saved / "tl6")  # into a7's freed slot and rows
    others = [bank.slot_of(i) for i in range(1, 202) if i != multi.id_of("new")]
    for name in ("u", "v", "a_index", "b_index"):
        assert torch.equal(getattr(bank, name)[others], snapshot[name][others]), name
    for name, index in (("A", "a_index"), ("B", "b_index")):
        rows = snapshot[index][others].unique()
        assert torch.equal(getattr(bank, name)[rows], snapshot[name][rows]), name
    tokens = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        mixed = multi(tokens, adapter_ids=[multi.id_of("new"), multi.id_of("a150")]).logits
    torch.testing.assert_close(mixed[0], alone("tl6", saved, tokens)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        mixed[1], alone(["tl6", "lora", "vera", "tl2"][150 % 4], saved, tokens)[1], rtol=1e-5, atol=1e-5
    )


def test_bad_requests(saved, tmp_path):
    multi = MultiAdapterModel(tiny_model("llama"))
    multi.add("tl6", saved / "tl6")
    tokens = torch.randint(0, 128, (2, 5))
    with pytest.raises(TiedLoraError, match="need one id per row \\(2\\)"):
        multi(tokens, adapter_ids=[1])
    with pytest.raises(TiedLoraError, match="each 0 \\(none\\) or a loaded adapter's id"):
        multi(tokens, adapter_ids=[1, 7])
    with pytest.raises(TiedLoraError, match="already loaded"):
        multi.add("tl6", saved / "tl6")
    with pytest.raises(TiedLoraError, match="No adapter named 'x' is loaded"):
        multi.remove("x")
    other = tmp_path / "gpt2"
    tiedlora.save(tiedlora.apply(tiny_model("gpt2"), TiedLoraConfig.preset("tl6", rank=2)), other)
    with pytest.raises(TiedLoraError, match="was made for another base model: a .gpt2. model"):
        multi.add("gpt2", other)


def test_banks_are_buffers_that_move_with_the_model_and_stay_out_of_its_state_dict(saved):
    multi = MultiAdapterModel(tiny_model("llama"))
    multi.add("tl6", saved / "tl6")
    tokens = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    multi(tokens, adapter_ids=[1])  # stacks the banks
    bank = multi.bank("qkv")
    buffers = {id(b) for b in multi.buffers()}
    assert all(id(getattr(bank, n)) in buffers for n in ("A", "B", "u", "v", "a_index", "b_index"))
    assert not [k for k in multi.state_dict() if k.startswith("banks.")]  # adapters live in their own folders
    multi.double()
    assert bank.A.dtype == bank.u.dtype == torch.float64 and bank.a_index.dtype == torch.long


def test_the_shared_input_of_q_k_v_is_dropped_after_each_call(saved):
    multi = MultiAdapterModel(tiny_model("llama"))
    multi.add("tl6", saved / "tl6")
    with torch.no_grad():
        multi(torch.zeros(2, 3, dtype=torch.long), adapter_ids=[1, 0])
    downs = {down for m in multi.modules() if hasattr(m, "_parts") for down, _ in m._parts}
    assert len(downs) == 3 and all(d.shared.empty for d in downs)


# Every group the library adapts, on every layout: adapters of other groups, ranks in three
# buckets (8, 16, 32) and a mapping that overlaps q/k/v, all in one batch.
EVERY_GROUP = {
    "qkv": dict(config="tl6", rank=3, targets=["qkv"]),
    "all": dict(config="lora", rank=12, targets=["qkv", "o", "mlp_in", "mlp_out"]),
    "out": dict(config="tl5", rank=20, targets=["o", "mlp_out"]),
    "mlp": dict(config="vera", rank=5, targets=["mlp_in"], layers=[1]),
}


def every_group_adapters(kind, root):
    folders = {}
    for i, (name, spec) in enumerate(EVERY_GROUP.items()):
        spec = dict(spec)
        cfg = TiedLoraConfig.preset(spec.pop("config"), alpha=16, seed=i, **spec)
        model = randomize(tiedlora.apply(tiny_model(kind), cfg), seed=i, trainable_only=True)
        folders[name] = tiedlora.save(model, root / name)
    if kind == "llama":  # a mapping of two of q/k/v, served beside the qkv alias on the same projections
        cfg = TiedLoraConfig.preset("tl6", rank=4, alpha=16, targets={"qk": ["self_attn.q_proj", "self_attn.k_proj"]})
        folders["map"] = tiedlora.save(randomize(tiedlora.apply(tiny_model(kind), cfg), seed=9), root / "map")
    return folders


def test_every_group_and_rank_bucket_in_one_batch_equals_each_adapter_alone(kind, tmp_path):
    folders = every_group_adapters(kind, tmp_path)
    multi = MultiAdapterModel(tiny_model(kind))
    ids = {name: multi.add(name, folder) for name, folder in folders.items()}
    rows = [None, *folders, "all", "qkv"]
    tokens = torch.randint(0, 128, (len(rows), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = multi(tokens, adapter_ids=[0 if r is None else ids[r] for r in rows]).logits
        for i, name in enumerate(rows):
            model = tiny_model(kind) if name is None else tiedlora.load(tiny_model(kind), folders[name])
            alone_logits = model(tokens[i : i + 1]).logits[0]
            assert (alone_logits - tiny_model(kind)(tokens[i : i + 1]).logits[0]).abs().max() > 1e-3 or name is None
            torch.testing.assert_close(mixed[i], alone_logits, rtol=1e-5, atol=1e-5)
        for name in folders:  # each alone in a batch of its own rows: one bank, no gather
            j = rows.index(name)
            alone_batch = multi(tokens[[j, 0]], adapter_ids=[ids[name], 0]).logits
            torch.testing.assert_close(alone_batch[0], mixed[j], rtol=1e-5, atol=1e-5)


def test_a_row_computes_at_its_own_adapters_rank_bucket(tmp_path):
    """A resident rank-40 adapter pads no other adapter's rows: a batch of rank-8 rows gathers
    rank-8 matrices only, and a mixed batch each row at its own bucket."""
    small = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=8)), seed=1)
    big = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=40)), seed=2)
    multi = MultiAdapterModel(tiny_model("llama"))
    s, b = (
        multi.add("small", tiedlora.save(small, tmp_path / "s")),
        multi.add("big", tiedlora.save(big, tmp_path / "b")),
    )
    seen = []
    multi.model.register_forward_pre_hook(
        lambda *_: seen.append({bank.rank: bank.rows_a.shape for bank in multi.groups["g0"].active})
    )
    tokens = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        multi(tokens, adapter_ids=[s, s, 0])
        mixed = multi(tokens, adapter_ids=[s, b, 0]).logits
    assert seen[0] == {8: (3, 3, 8, 64)}  # every row of the batch at rank 8, the base's at the zero slot
    assert seen[1] == {8: (1, 3, 8, 64), 64: (1, 3, 64, 64)}  # each row at its own bucket
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], tiedlora.load(tiny_model("llama"), tmp_path / "b")(tokens[1:2]).logits[0])
        torch.testing.assert_close(mixed[0], small(tokens[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_ranks_above_max_rank_and_groups_the_model_lacks_are_refused_by_name(tmp_path):
    big = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=40))
    with pytest.raises(TiedLoraError, match="has rank 40, more than this server's max_rank of 32; serve it with"):
        MultiAdapterModel(tiny_model("llama"), max_rank=32).add("big", tiedlora.save(big, tmp_path / "b"))
    assert MultiAdapterModel(tiny_model("llama")).max_rank == 256
    cfg = TiedLoraConfig.preset("tl6", rank=2, targets={"qk": ["self_attn.q_proj", "self_attn.k_proj"]})
    folder = tiedlora.save(tiedlora.apply(tiny_model("llama"), cfg), tmp_path / "map")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"]["targets"]["qk"] = meta["base_model"]["groups"]["qk"]["members"] = ["self_attn.q_proj", "mlp.nope"]
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(TiedLoraError, match="adapts the group 'qk' .*which this base model does not have"):
        MultiAdapterModel(tiny_model("llama")).add("map", folder)
