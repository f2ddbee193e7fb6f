"""DeepSeek-V3 family against transformers (logits, checkpoints, MTP) and its config; the MLA caches, MoE
and speculation tests, which need no transformers, are in test_engine.py."""
import json

import pytest
import torch

from r1kit.formats import hf
from r1kit.formats.hf_deepseek import config_from_hf, config_to_hf

from model_fixtures import YARN, build, tiny

transformers = pytest.importorskip("transformers")


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
