"""SFT stage: data formats and their errors, packing that keeps documents apart, exact resume."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from r1kit import checkpoint
from r1kit.models.llama import IGNORE_INDEX
from r1kit.stages import sft
from r1kit.stages.sft import DataError, SFTConfig, encode_examples, make_batch, pack, row_messages
from r1kit.tasks import get_task
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import ModelSpec, build_model

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "max_position_embeddings": 128}
DEEPSEEK = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
            "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 128}


def traces(n, seed=0):
    task, rng = get_task("arithmetic", digits=2, train_size=500, test_size=20), random.Random(seed)
    return [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": task.trace(p, rng)}]}
            for p in task.problems("train", n)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    corpus = [m["messages"][0]["content"] + m["messages"][1]["content"] for m in traces(200)]
    return build_bpe_tokenizer(corpus, vocab_size=60, all_bytes=False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok):
    """A checkpoint only for its tokenizer (a fresh student shares it)."""
    d = tmp_path_factory.mktemp("teacher")
    checkpoint.save(build_model(ModelSpec("llama", LLAMA), tok.vocab_size, 0), tok, d)
    return d


# ---------------------------------------------------------------------------------------------- data
def test_row_formats():
    user, bot = {"role": "user", "content": "1+2="}, {"role": "assistant", "content": "<answer>3</answer>"}
    assert row_messages({"messages": [user, bot]}, "f:1") == [user, bot]
    assert row_messages({"prompt": "1+2=", "response": "<answer>3</answer>"}, "f:1") == [user, bot]
    assert row_messages({"prompt": "1+2=", "completion": "<answer>3</answer>", "system": "S"}, "f:1") == \
        [{"role": "system", "content": "S"}, user, bot]
    assert row_messages({"prompt": [user], "completion": [bot]}, "f:1") == [user, bot]  # TRL conversational


def test_malformed_rows_name_file_and_line(tmp_path, tok):
    good = json.dumps(traces(1)[0])
    cases = [("{not json", r"bad.jsonl:2: invalid JSON"),
             ('{"text": "hi"}', r"bad.jsonl:2: expected a 'messages' list, or 'prompt' and 'response'"),
             ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:2: message 0"),
             ('{"messages": [{"role": "user", "content": "x"}]}', r"bad.jsonl:2: no assistant message"),
             ('[1, 2]', r"bad.jsonl:2: expected a JSON object")]
    for line, pattern in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
        with pytest.raises(DataError, match=pattern):
            encode_examples(tok, [str(path)])


def test_empty_set_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no training examples"):
        encode_examples(tok, [str(path)])
    with pytest.raises(DataError, match="not found"):
        encode_examples(tok, [str(tmp_path / "missing.jsonl")])


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys, teacher_dir):
    from r1kit.cli import main
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(traces(1)[0]), "{oops"])
    rc = main(["sft", "--data", str(path), "--set", f"sft.base={teacher_dir}", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- packing
def test_pack_fills_rows_in_order():
    assert pack([5, 3, 4, 2], [0, 1, 2, 3], 8, "document") == [[0, 1], [2, 3]]
    assert pack([9, 3], [0, 1], 8, "document") == [[0], [1]]  # too long: a row of its own (cut to max_len)
    assert pack([2, 2, 2], [2, 1, 0], 8, "none") == [[2], [1], [0]]


@pytest.mark.parametrize("arch,conf", [("llama", LLAMA), ("deepseek", DEEPSEEK)])
def test_document_packing_equals_separate_sequences(tok, arch, conf):
    """A packed row with the document mask computes exactly what each conversation alone would."""
    examples = [tok.render_chat(t["messages"]) for t in traces(3)]
    model = build_model(ModelSpec(arch, conf), tok.vocab_size, 0).eval()
    idx, targets, packing = make_batch(examples, [[0, 1, 2]], SFTConfig(max_len=128), tok.pad_id)
    assert set(packing) == {"positions", "attn_mask"}  # passed explicitly: no stand-in cache
    with torch.no_grad():
        packed = model(idx, **packing)[0]
        nll = model(idx, targets, loss_reduction="none", **packing)[0]
        at = 0
        for ids, mask in examples:
            alone_idx, alone_tgt, _ = make_batch([(ids, mask)], [[0]], SFTConfig(max_len=128), tok.pad_id)
            assert torch.allclose(packed[at: at + len(ids)], model(alone_idx)[0], atol=1e-5)
            assert torch.allclose(nll[at: at + len(ids)], model(alone_idx, alone_tgt, loss_reduction="none")[0],
                                  atol=1e-5)
            at += len(ids)


def test_targets_are_assistant_tokens_and_never_cross_documents(tok):
    rows = traces(2)
    examples = [tok.render_chat(t["messages"]) for t in rows]
    idx, targets, _ = make_batch(examples, [[0, 1]], SFTConfig(max_len=128), tok.pad_id)
    n0 = len(examples[0][0])
    assert targets[0, n0 - 1] == IGNORE_INDEX  # the last token of document 0 predicts nothing
    for lo, hi, row in ((0, n0, rows[0]), (n0, targets.shape[1], rows[1])):
        t = targets[0, lo:hi]
        text = tok.decode(t[t != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        assert text == row["messages"][1]["content"] + tok.eos_token  # the answer and its end, no prompt


# ---------------------------------------------------------------------------------------------- training
def sft_cfg(tmp_path, data, teacher_dir, **kw):
    base = dict(data=[str(data)], tokenizer=str(teacher_dir), model=ModelSpec("llama", LLAMA),
                out_dir=str(tmp_path), steps=6, batch_size=4, max_len=128, lr=3e-3, warmup=2, save_every=2,
                eval_problems=0)
    return SFTConfig(**{**base, **kw})


def test_fresh_student_trains_and_resumes_exactly(tmp_path, teacher_dir, monkeypatch):
    data = write_jsonl(tmp_path / "t.jsonl", traces(40))
    a = sft.run(sft_cfg(tmp_path / "a", data, teacher_dir))
    assert a["steps"] == 6 and a["final_loss"] < json.loads((tmp_path / "a" / "metrics.jsonl").read_text()
                                                            .splitlines()[0])["loss"]
    real = sft._train_step

    def dies_at_step_5(cfg, model, opt, ex, rows, pad, step, steps):
        if step == 4:  # after the step-4 checkpoint: steps 5 and 6 must be redone on resume
            raise KeyboardInterrupt
        return real(cfg, model, opt, ex, rows, pad, step, steps)

    monkeypatch.setattr(sft, "_train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.run(sft_cfg(tmp_path / "b", data, teacher_dir))
    monkeypatch.setattr(sft, "_train_step", real)
    sft.run(sft_cfg(tmp_path / "b", data, teacher_dir))
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_resume_on_different_data_is_refused(tmp_path, teacher_dir):
    a = write_jsonl(tmp_path / "a.jsonl", traces(20))
    sft.run(sft_cfg(tmp_path / "o", a, teacher_dir, steps=2))
    b = write_jsonl(tmp_path / "b.jsonl", traces(20, seed=1)[:10])
    with pytest.raises(DataError, match="different data"):
        sft.run(sft_cfg(tmp_path / "o", b, teacher_dir, steps=2))


def test_fine_tunes_a_deepseek_checkpoint(tmp_path, tok):
    ckpt = tmp_path / "ds"
    checkpoint.save(build_model(ModelSpec("deepseek", DEEPSEEK), tok.vocab_size, 0), tok, ckpt)
    data = write_jsonl(tmp_path / "t.jsonl", traces(12))
    s = sft.run(SFTConfig(data=[str(data)], base=str(ckpt), out_dir=str(tmp_path / "o"), steps=8, batch_size=2,
                          max_len=128, lr=3e-3, warmup=1, eval_problems=0))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 8 and losses[-1] < losses[0] - 0.5, losses  # it learns (finite is not enough)
    model, _ = checkpoint.load(tmp_path / "o" / "model")
    before, _ = checkpoint.load(ckpt)
    assert type(model).__name__ == "DeepseekV3"
    mtp = [k for k in model.state_dict() if k.startswith("layers.2.") and "experts" not in k and "weight" in k]
    assert mtp and all(not torch.equal(model.state_dict()[k], before.state_dict()[k]) for k in mtp
                       if not k.endswith(("embed.weight", "head.weight")))  # the MTP block trained


def test_needs_a_base_or_a_tokenizer(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", traces(2))
    with pytest.raises(Exception, match="sft.base .* or sft.tokenizer"):
        sft.run(SFTConfig(data=[str(data)], out_dir=str(tmp_path / "o")))


def test_lora_sft_of_a_deepseek_checkpoint_with_every_memory_switch(tmp_path, tok):
    """LoRA + checkpointing + chunked losses: the base stays bit-identical, the loss falls, the adapter
    directory loads back (PEFT format) and SFT resumes from it."""
    from r1kit.models import lora
    ckpt = tmp_path / "ds"
    checkpoint.save(build_model(ModelSpec("deepseek", DEEPSEEK), tok.vocab_size, 0), tok, ckpt)
    data = write_jsonl(tmp_path / "t.jsonl", traces(12))
    cfg = dict(data=[str(data)], base=str(ckpt), out_dir=str(tmp_path / "o"), batch_size=2, max_len=128, lr=1e-2,
               warmup=1, eval_problems=0, lora_rank=8, grad_checkpointing=True, logprob_chunk=32, save_every=4)
    s = sft.run(SFTConfig(steps=8, **cfg))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 8 and losses[-1] < losses[0] - 0.15, losses  # only the rank-8 adapters learn
    assert (tmp_path / "o" / "model" / "adapter_config.json").exists()
    model, _ = checkpoint.load(tmp_path / "o" / "model")
    before, _ = checkpoint.load(ckpt)
    frozen = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(p, dict(before.named_parameters())[n]) for n, p in frozen.items())
    assert lora.has_lora(model)
    assert sft.run(SFTConfig(steps=10, **cfg))["steps"] == 10  # resumes from the adapter checkpoint
