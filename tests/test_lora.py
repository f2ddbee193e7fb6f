"""LoRA: exact merge/unmerge/off switches on both families, and PEFT's on-disk format both ways."""
import pytest
import torch

from r1kit.formats import hf, peft as peft_fmt
from r1kit.models import lora
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig


def dense(arch="LlamaForCausalLM", **kw):
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, architecture=arch, **kw)
    return Llama(cfg).init_weights(seed=0, std=0.1).eval()


def moe(attn_impl="absorb"):
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=4,
                         num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    return DeepseekV3(cfg, attn_impl).init_weights(0, 0.1).eval()


def randomise_adapters(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


IDX = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", [dense, moe], ids=["dense", "deepseek"])
def test_fresh_adapter_is_identity_and_switches_are_exact(build):
    m = build()
    with torch.no_grad():
        base = m(IDX)
    names = lora.apply_lora(m, rank=4)
    assert names and all(p.requires_grad == ("lora_" in n) for n, p in m.named_parameters())
    with torch.no_grad():
        assert torch.equal(m(IDX), base)  # B = 0: a new adapter changes nothing
        randomise_adapters(m)
        adapted = m(IDX)
        assert (adapted - base).abs().max() > 1e-3  # the adapter really is in the path
        with lora.adapters_off(m):
            assert (m(IDX) - base).abs().max() <= 1e-6
        with lora.merged(m):
            assert (m(IDX) - adapted).abs().max() <= 1e-5
        assert (m(IDX) - adapted).abs().max() <= 1e-5  # unmerged again on exit
        with lora.merged(m), lora.adapters_off(m):  # off works on merged weights too
            assert (m(IDX) - base).abs().max() <= 1e-5
        lora.fold(m)
        assert not lora.has_lora(m) and (m(IDX) - adapted).abs().max() <= 1e-5


def test_targets_by_alias_hf_and_r1kit_names():
    m = dense()
    names = lora.apply_lora(m, rank=2, targets=["q", "v_proj", "w2"])
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["w2", "wq", "wv"]
    assert len(names) == 6
    with pytest.raises(ValueError, match="unknown module 'qq'"):
        lora.resolve_targets(["qq"])
    moe_names = lora.apply_lora(moe(), rank=2, targets=["q", "k", "gate"])
    leaves = {n.rsplit(".", 1)[-1] for n in moe_names}
    assert leaves == {"wq_a", "wq_b", "wkv_a", "wkv_b", "w1"}
    assert any(".experts." in n for n in moe_names) and any("shared_experts" in n for n in moe_names)
    assert not any(n.endswith("ffn.gate") for n in moe_names)  # the router is never wrapped


def test_gradients_reach_only_adapters():
    m = dense().train()
    lora.apply_lora(m, rank=4)
    randomise_adapters(m)
    m(IDX, targets=IDX).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    assert all(float(p.grad.abs().sum()) > 0 for n, p in m.named_parameters() if "lora_" in n)


def test_absorbed_mla_sees_the_adapter_like_naive():
    a, b = moe("absorb"), moe("naive")
    for m in (a, b):
        lora.apply_lora(m, rank=4, targets=["k", "v", "q", "o"])
        randomise_adapters(m)
    with torch.no_grad():
        assert (a(IDX) - b(IDX)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# PEFT format, checked against peft itself
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def peft():
    pytest.importorskip("transformers")  # per test: the LoRA tests above need neither
    return pytest.importorskip("peft")


def hf_pair(tmp_path, arch="Qwen2ForCausalLM"):
    import transformers
    m = dense(arch, tie_word_embeddings=arch == "Qwen2ForCausalLM", attention_bias=arch == "Qwen2ForCausalLM")
    (tmp_path / "base").mkdir()
    hf.save_model(m, tmp_path / "base")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    return m, ref


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_our_adapter_loads_in_peft(tmp_path, arch, peft):
    m, ref = hf_pair(tmp_path, arch)
    lora.apply_lora(m, rank=4, alpha=8)
    randomise_adapters(m)
    (tmp_path / "adapter").mkdir()
    peft_fmt.save_adapter(m, tmp_path / "adapter", base=str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (m(IDX) - theirs(IDX).logits).abs().max() <= 1e-5


def test_peft_adapter_loads_in_r1kit(tmp_path, peft):
    m, ref = hf_pair(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                          init_lora_weights=False)  # random A and B, so the adapter is not a no-op
    torch.manual_seed(0)
    theirs = peft.get_peft_model(ref, cfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    names = peft_fmt.load_adapter(m, tmp_path / "adapter")
    assert len(names) == 6
    with torch.no_grad():
        want = theirs(IDX).logits
        assert (m(IDX) - want).abs().max() <= 1e-5


def test_bad_adapter_config_is_one_line(tmp_path, peft):
    m, _ = hf_pair(tmp_path)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true, "target_modules": ["q_proj"]}')
    with pytest.raises(hf.CheckpointError, match=r"adapter_config.json: field 'use_dora'"):
        peft_fmt.load_adapter(m, d)


def test_merge_verb_folds_an_adapter_into_a_full_checkpoint(tmp_path, tiny_tok):
    import r1kit
    from r1kit.cli import main
    from r1kit.formats import peft as peft_fmt
    m = Llama(LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)).init_weights(seed=0, std=0.1).eval()
    r1kit.save(m, tiny_tok, tmp_path / "base")
    lora.apply_lora(m, rank=4)
    randomise_adapters(m)
    m.lora["base"] = str(tmp_path / "base")
    r1kit.save(m, tiny_tok, tmp_path / "adapter")
    assert peft_fmt.is_adapter_dir(tmp_path / "adapter")
    loaded, _ = r1kit.load(tmp_path / "adapter")  # base + adapter, as r1kit.load reads adapter dirs
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = r1kit.load(tmp_path / "merged")
    assert not lora.has_lora(merged)
    idx = torch.randint(0, tiny_tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged(idx) - m(idx)).abs().max() <= 1e-5 and (loaded.eval()(idx) - m(idx)).abs().max() <= 1e-6
    assert main(["merge", str(tmp_path / "base"), "--out", str(tmp_path / "x")]) == 2  # not an adapter: one line
