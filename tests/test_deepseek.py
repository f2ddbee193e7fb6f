"""DeepSeek-V3 family: parity with transformers, MLA paths and caches, MoE balancing, MTP, speculation."""
import json

import pytest
import torch

from r1kit.engine import Engine
from r1kit.formats import hf
from r1kit.formats.hf_deepseek import config_from_hf, config_to_hf
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3, MLACache, NaiveMLACache
from r1kit.speculative import mtp_generate

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def tiny(**kw) -> DeepseekConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    return DeepseekConfig(**{**base, **kw})


def build(cfg, seed=0, std=0.2, attn_impl="absorb") -> DeepseekV3:
    torch.manual_seed(seed)
    m = DeepseekV3(cfg, attn_impl).init_weights(seed, std)
    for g in m.gates():  # a non-zero bias, so selection and weighting visibly differ
        g.e_score_correction_bias.normal_(0, 0.1)
    return m.eval()


def hf_load(path, cls=None):
    cls = cls or transformers.DeepseekV3ForCausalLM
    model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    return model.eval(), info


# ---------------------------------------------------------------------------------------------
# Interop with transformers
# ---------------------------------------------------------------------------------------------
CASES = {  # all: dense layer first, then MoE with group-limited routing (4 groups, keep 2)
    "plain-q+yarn+mtp": dict(q_lora_rank=None, rope_scaling=YARN, num_nextn_predict_layers=1),
    "q-lora": dict(q_lora_rank=12, num_nextn_predict_layers=0),
    "q-lora+yarn+no-norm": dict(q_lora_rank=12, rope_scaling=YARN, norm_topk_prob=False,
                                num_nextn_predict_layers=0, rope_theta=500.0),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_through_our_checkpoint(case, tmp_path):
    ours = build(tiny(**CASES[case]))
    hf.save_model(ours, tmp_path)
    theirs, info = hf_load(tmp_path)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers drops MTP layers by a fixed pattern (model.layers.61 — V3's depth); at other depths
    # it reports them as unexpected and loads everything else
    mtp_prefix = f"model.layers.{ours.config.num_hidden_layers}."
    assert all(k.startswith(mtp_prefix) for k in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == bool(ours.config.num_nextn_predict_layers)
    idx = torch.randint(0, 64, (2, 40))  # 40 > original context 16: YaRN's interpolated band is used
    with torch.no_grad():
        want = theirs(idx).logits
        for impl in ("absorb", "naive"):
            ours.attn_impl = impl
            assert (ours(idx) - want).abs().max() <= 1e-4, impl
        ours.attn_impl = "absorb"
        again = hf.load_model(tmp_path).eval()
        assert torch.equal(again(idx), ours(idx))
    assert again.config == ours.config


def test_transformers_checkpoint_loads(tmp_path):
    cfg = config_to_hf(tiny(q_lora_rank=12, rope_scaling=YARN))
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    with torch.no_grad():
        for name, b in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_model(tmp_path).eval()
    assert ours.config.num_nextn_predict_layers == 0  # transformers saves no MTP weights
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max() <= 1e-4


def test_mtp_matches_transformers_mtp_model(tmp_path):
    from transformers.modeling_layers import MtpModel
    ours = build(tiny(num_hidden_layers=2))
    hf.save_model(ours, tmp_path)

    class WithMTPAt2(transformers.DeepseekV3ForCausalLM):  # V3's own class names layer 61
        _keys_to_ignore_on_load_unexpected = [r"model\.layers\.2.*"]

    theirs, info = hf_load(tmp_path, WithMTPAt2)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    mtp = MtpModel.from_pretrained(theirs)
    idx = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        h = ours.hidden(idx)
        mine = ours.head(ours.mtp(1, h[:, :-1], idx[:, 1:]))
        h_hf = theirs.model(idx).last_hidden_state
        # transformers numbers depth-1 positions from 1; RoPE is relative, so scores agree
        want = mtp._project_to_logits(mtp.forward_layer(0, h_hf[:, :-1], torch.arange(1, 20)[None], None,
                                                        input_ids=idx[:, 1:]))
    assert (mine - want).abs().max() <= 1e-4


def test_translate_handles_expert_index_and_dense_tables_unchanged():
    assert hf.translate("layers.3.attn.wq.weight", hf.DENSE_NAME_MAP, True) == "model.layers.3.self_attn.q_proj.weight"
    assert hf.translate("model.layers.3.mlp.up_proj.weight", hf.DENSE_NAME_MAP, False) == "layers.3.ffn.w3.weight"
    fam = hf.FAMILIES["DeepseekV3ForCausalLM"]
    hf_name = "model.layers.12.mlp.experts.255.down_proj.weight"
    assert hf.translate("layers.12.ffn.experts.255.w2.weight", fam.name_map, True) == hf_name
    assert hf.translate(hf_name, fam.name_map, False) == "layers.12.ffn.experts.255.w2.weight"


def test_config_round_trip_and_checks():
    cfg = tiny(q_lora_rank=12, rope_scaling=YARN, balance="aux_loss", seq_aux_alpha=0.01, mtp_lambda=0.5)
    d = json.loads(json.dumps(config_to_hf(cfg)))
    assert config_from_hf(d, "config.json") == cfg
    assert d["r1kit"]["balance"] == "aux_loss" and d["num_key_value_heads"] == 2
    bad = {**d, "n_group": "4"}
    with pytest.raises(hf.CheckpointError, match="'n_group' must be an integer"):
        config_from_hf(bad, "config.json")
    with pytest.raises(hf.CheckpointError, match="num_experts_per_tok"):
        config_from_hf({**d, "num_experts_per_tok": 9}, "config.json")


@pytest.mark.parametrize("kw, name", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=8, topk_group=1), "n_group"),  # one expert per group: no top-2 group score
    (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok"),  # > 2 groups × 2 experts
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(balance="loss"), "balance"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
])
def test_inconsistent_config_names_the_field(kw, name):
    with pytest.raises(ValueError, match=rf"DeepseekConfig\.{name}="):
        tiny(**kw)


# ---------------------------------------------------------------------------------------------
# MLA paths and caches
# ---------------------------------------------------------------------------------------------
def test_naive_and_absorbed_agree():
    m = build(tiny(q_lora_rank=12, rope_scaling=YARN), std=0.3)
    idx = torch.randint(0, 64, (3, 30))
    with torch.no_grad():
        a = m(idx)
        m.attn_impl = "naive"
        assert (m(idx) - a).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_greedy_equals_uncached(impl):
    m = build(tiny(), std=0.5, attn_impl=impl)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]  # ragged: rows fill their caches independently
    got = Engine(m).generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    for p, samples in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert samples[0].tokens == seq[len(p):]


def test_cache_bytes_per_token_per_layer():
    c = tiny()
    m = DeepseekV3(c)
    latent = m.new_cache(2, 10)
    assert isinstance(latent, MLACache) and latent.c_kv.shape == (3, 2, 10, 16) and latent.k_pe.shape == (3, 2, 10, 8)
    assert latent.bytes_per_token_per_layer() == (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert m.new_cache(2, 10, dtype=torch.bfloat16).bytes_per_token_per_layer() == (16 + 8) * 2
    m.attn_impl = "naive"
    naive = m.new_cache(2, 10)
    assert isinstance(naive, NaiveMLACache)
    assert naive.bytes_per_token_per_layer() == c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4


# ---------------------------------------------------------------------------------------------
# MoE balancing and the training loss
# ---------------------------------------------------------------------------------------------
def _skewed_load(balance: str, steps: int) -> list[float]:
    """Every token prefers expert 0 (its affinity is lifted by +2 logits); → max/mean load per step."""
    cfg = tiny(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, bias_update_speed=0.02,
               balance=balance, num_nextn_predict_layers=0, num_hidden_layers=2)
    m = DeepseekV3(cfg).init_weights(0).train()
    gate, d = m.layers[1].ffn.gate, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(4, d, generator=g) / d ** 0.5)
        gate.weight[0] += 2.0 / d
    x = torch.randn(256, d, generator=g) + 1.0
    ratios = []
    for _ in range(steps):
        gate(x)  # a training forward (grad on) counts the routed tokens
        load = m.after_optimizer_step()[0].float()
        ratios.append(float(load.max() / load.mean()))
    return ratios


def test_bias_update_moves_load_toward_balance():
    free, none = _skewed_load("aux_free", 40), _skewed_load("none", 40)
    assert free[0] == none[0] > 2.5  # the same skewed start
    assert max(free[-10:]) <= 1.3 and min(none) > 2.5


def test_training_loss_parts_and_reductions():
    m = build(tiny(num_nextn_predict_layers=2)).train()
    idx = torch.randint(0, 64, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    loss = m(idx, targets)
    p = m.last_losses
    assert p["mtp"].shape == (2,)
    want = p["main"] + 0.3 * p["mtp"].mean() + p["balance"]
    assert torch.allclose(loss.detach(), want) and p["balance"] > 0
    loss.backward()
    assert m.layers[3].eh_proj.weight.grad is not None and m.layers[1].ffn.gate.weight.grad is not None
    load = m.after_optimizer_step()
    # only tokens with a target count: 2 main MoE layers see 2×15, MTP depths 2×14 and 2×13; k = 2 experts each
    assert load.shape == (4, 8) and load.sum(1).tolist() == [60, 60, 56, 52]
    nll = m(idx, targets, loss_reduction="none")
    assert nll.shape == (2, 16) and nll[:, -1].eq(0).all()
    m.eval()
    assert torch.allclose(m(idx, targets), nll.sum() / 30)


def test_bias_stays_fp32_in_bf16():
    m = build(tiny()).to(torch.bfloat16)
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in m.gates())
    with torch.no_grad():
        assert m(torch.randint(0, 64, (1, 5))).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# MTP self-speculative decoding
# ---------------------------------------------------------------------------------------------
def test_speculative_equals_greedy():
    cfg = tiny(vocab_size=16, num_hidden_layers=2, n_routed_experts=4, n_group=1, topk_group=1)
    m = DeepseekV3(cfg).init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):  # learn t → 3t+1 mod 16, so drafts are often (not always) right
        start = torch.randint(0, 16, (8, 1))
        seq = [start]
        for _ in range(23):
            seq.append((3 * seq[-1] + 1) % 16)
        seq = torch.cat(seq, 1)
        m.train()
        loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
    prompts = [[5, 0], [2, 7, 3, 1]]
    greedy = Engine(m).generate(prompts, max_new_tokens=20, temperature=0, ignore_eos=True)
    for p, g in zip(prompts, greedy):
        r = mtp_generate(m, p, 20)
        assert r.tokens == g[0].tokens
        assert r.drafted > 0 and r.accepted > 0
    want = greedy[0][0].tokens
    stop = want[3]
    assert mtp_generate(m, [5, 0], 20, stop_ids={stop}).tokens == want[: want.index(stop) + 1]
