"""Dense family against transformers (parity, HF round trip, sharded checkpoints) and bad input; the engine
and KV-cache tests, which need no transformers, are in test_engine.py."""
import json
import shutil

import pytest
import torch

import r1kit
from r1kit.engine import Engine, SamplingParams
from r1kit.formats import hf

from model_fixtures import FAMILIES, make_model

transformers = pytest.importorskip("transformers")


def hf_greedy(ref, ids, n):
    ids_t = torch.tensor([ids])  # explicit mask: HF would otherwise treat token id 0 as padding
    out = ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_transformers_and_round_trip(family, tmp_path, tiny_tok):
    m = make_model(family)
    r1kit.save(m, tiny_tok, tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = m(idx), ref(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = idx[0, :8].tolist()
    greedy = Engine(m).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert greedy[0][0].tokens == hf_greedy(ref, prompt, 12)
    # transformers saves it again; we load that and get the same logits
    ref.save_pretrained(tmp_path / "hf_saved")
    shutil.copy(tmp_path / "ckpt" / "tokenizer.json", tmp_path / "hf_saved")
    shutil.copy(tmp_path / "ckpt" / "tokenizer_config.json", tmp_path / "hf_saved")
    m2, _ = r1kit.load(tmp_path / "hf_saved")
    with torch.no_grad():
        assert (m2(idx) - ours).abs().max().item() <= 1e-6


def test_sharded_checkpoint_round_trip(tmp_path, tiny_tok):
    m = make_model("llama3")
    r1kit.save(m, tiny_tok, tmp_path / "c", shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "c").glob("model-*.safetensors"))
    assert len(files) > 1 and (tmp_path / "c" / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32)
    m2, _ = r1kit.load(tmp_path / "c")
    idx = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert (m2(idx) - m(idx)).abs().max() == 0
        assert (ref(idx).logits - m(idx)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the file and the key or tensor
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, tiny_tok):
    r1kit.save(make_model("llama3"), tiny_tok, tmp_path / "c")
    return tmp_path / "c"


def _edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("change, needle", [
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' must be an integer"),
    ({"rms_norm_eps": True}, "field 'rms_norm_eps' must be a number"),
    ({"architectures": ["GPT9ForCausalLM"]}, "unknown architecture 'GPT9ForCausalLM'"),
])
def test_bad_config(saved, change, needle):
    _edit_config(saved, **change)
    with pytest.raises(hf.CheckpointError) as e:
        r1kit.load(saved)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_bad_tensors(saved):
    from safetensors.torch import load_file, save_file
    f = saved / "model.safetensors"
    sd = load_file(f)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, f)
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        r1kit.load(saved)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, f)
    with pytest.raises(hf.CheckpointError, match=r"up_proj.weight' has shape \[3, 3\], config.json implies \[160, 64\]"):
        r1kit.load(saved)


def test_cli_reports_bad_checkpoint_in_one_line(saved, capsys):
    from r1kit.cli import main
    _edit_config(saved, vocab_size="big")
    assert main(["generate", str(saved), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]


def test_generate_api_and_cli(saved, capsys):
    from r1kit.cli import main
    model, tok = r1kit.load(saved)
    texts = r1kit.generate(model, tok, ["12+34=", "hi"], n=2, max_new_tokens=5, seed=0)
    assert len(texts) == 2 and len(texts[0]) == 2 and all(isinstance(t, str) for t in texts[0])
    assert main(["generate", str(saved), "--prompt", "12+34=", "--max-new-tokens", "4"]) == 0
    assert "> 12+34=" in capsys.readouterr().out


def test_tied_checkpoint_that_stores_its_head_loads(tmp_path, tiny_tok):
    from safetensors.torch import load_file, save_file
    m = make_model("qwen2")  # tied
    r1kit.save(m, tiny_tok, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, f)
    m2, _ = r1kit.load(tmp_path / "c")
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(m2(idx), m(idx))


def test_a_crash_between_the_two_renames_of_a_save_loses_nothing(tmp_path, tiny_tok):
    from r1kit import checkpoint
    m = make_model("llama3")
    r1kit.save(m, tiny_tok, tmp_path / "c", trainer_state={"state": {"step": 3}})
    (tmp_path / "c").rename(tmp_path / ".c.old-4242")  # the old one moved aside, the new one never arrived
    assert checkpoint.has_trainer_state(tmp_path / "c")
    m2, _ = r1kit.load(tmp_path / "c")
    assert (tmp_path / "c" / "config.json").exists() and oct((tmp_path / "c").stat().st_mode)[-3:] != "700"
