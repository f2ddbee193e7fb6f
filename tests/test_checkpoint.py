"""Checkpoint writing: file modes follow the umask, writes are fsynced before the rename, a killed
writer's temporaries are cleaned up, and only the main process writes under torch.distributed."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import r1kit
from r1kit import checkpoint
from r1kit.formats import hf
from r1kit.formats.gguf import export_gguf
from r1kit.models.llama import Llama, LlamaConfig


def tiny():
    return Llama(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).init_weights(0)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path, tiny_tok, umask, mask, file_mode, dir_mode):
    umask(mask)
    model = tiny()
    r1kit.save(model, tiny_tok, tmp_path / "ckpt", trainer_state={"state": {"step": 1}})
    r1kit.save(model, tiny_tok, tmp_path / "sharded", shard_bytes=20_000)
    export_gguf(model, tiny_tok, tmp_path / "m.gguf", "F16")
    for root in (tmp_path / "ckpt", tmp_path / "sharded"):
        got = modes(root)
        assert len(got) > 5 and {p: m for p, m in got.items() if m != ((dir_mode if (root / p).is_dir() else file_mode))} == {}
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == file_mode


def test_everything_is_fsynced_before_the_rename(tmp_path, tiny_tok, monkeypatch):
    synced, events = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append((str(a), str(b), list(synced))), real_replace(a, b))[1])
    out = tmp_path / "ckpt"
    r1kit.save(tiny(), tiny_tok, out, trainer_state={"state": {"step": 1}})
    r1kit.save(tiny(), tiny_tok, out)  # a second save swaps the first one out
    tmp, dst, before = next(e for e in reversed(events) if e[1] == str(out))
    written = [str(p).replace(str(out), tmp) for p in [*out.rglob("*"), out]]
    assert len(written) > 5 and set(written) <= set(before)  # every file and directory, the temp dir included
    assert str(tmp_path) in synced[len(before):]  # then the parent, which holds the renames


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fds")
def test_write_text_atomic_syncs_before_renaming(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    checkpoint.write_text_atomic(tmp_path / "eval.json", "{}\n")
    assert synced == [str(tmp_path / "eval.json.tmp"), str(tmp_path)]


KILLED_WRITER = """
import os, sys
from r1kit.formats.hf import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"0" * 100_000)
    os.kill(os.getpid(), 9)  # killed mid-write: the temporary stays behind
"""


def test_a_killed_writers_temporaries_are_removed_next_time(tmp_path, tiny_tok):
    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(r1kit.__file__).parents[1])}
    r1kit.save(tiny(), tiny_tok, out, trainer_state={"state": {"step": 1}})
    kill = lambda: subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=env).returncode  # noqa: E731
    assert kill() == -9
    (tmp_path / f".ckpt.old-{os.getpid() + 1}").mkdir()  # a swap that completed but did not delete the old copy
    assert len(list(tmp_path.glob(".ckpt.*"))) == 2
    assert checkpoint.has_trainer_state(out)  # what a stage does on start
    assert list(tmp_path.glob(".ckpt.*")) == []
    assert kill() == kill() == -9  # the second writer's start already removed the first one's leftovers
    assert len(list(tmp_path.glob(".ckpt.tmp-*"))) == 1
    with hf.atomic_dir(out) as live:  # the next save cleans the dead ones up, never a live writer's
        assert list(tmp_path.glob(".ckpt.tmp-*")) == [live]
        hf.recover_swap(out)  # e.g. another process starting meanwhile
        assert live.exists()
        r1kit.save(tiny(), tiny_tok, live / "inner")  # fill it with something loadable
    assert (out / "inner" / "model.safetensors").exists() and list(tmp_path.glob(".ckpt.*")) == []


# ---------------------------------------------------------------------------------------------
# generation_config.json: the checkpoint's own, R1's settings only where a stage asks for them
# ---------------------------------------------------------------------------------------------
OWN_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.7, "top_k": 20,
                  "repetition_penalty": 1.05, "transformers_version": "5.0.0"}


def _gen(path):
    return json.loads((Path(path) / "generation_config.json").read_text())


def test_a_checkpoints_own_generation_config_is_kept(tmp_path, tiny_tok):
    r1kit.save(tiny(), tiny_tok, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(OWN_GENERATION))  # as published
    model, tok = r1kit.load(tmp_path / "hf")
    r1kit.save(model, tok, tmp_path / "copy")
    assert _gen(tmp_path / "copy") == OWN_GENERATION
    r1kit.save(model, tok, tmp_path / "r1", generation="r1")  # a stage that asks for R1's settings
    assert _gen(tmp_path / "r1") == {**OWN_GENERATION, "temperature": 0.6, "top_p": 0.95}
    (tmp_path / "hf" / "generation_config.json").write_text("{bad")
    with pytest.raises(hf.CheckpointError, match=r"generation_config.json: invalid JSON at line 1"):
        r1kit.load(tmp_path / "hf")


def test_a_model_without_one_gets_only_its_token_ids(tmp_path, tiny_tok):
    r1kit.save(tiny(), tiny_tok, tmp_path / "fresh")  # e.g. pretrain from scratch
    assert _gen(tmp_path / "fresh") == {"bos_token_id": tiny_tok.bos_id, "eos_token_id": tiny_tok.stop_ids}
    with pytest.raises(ValueError, match=r"generation_config = 'hot'; choose one of \['r1', 'source'\]"):
        r1kit.save(tiny(), tiny_tok, tmp_path / "x", generation="hot")


def test_sft_keeps_the_bases_generation_config_unless_told(tmp_path, tiny_tok):
    from r1kit.config import ConfigError
    from r1kit.stages import sft
    from r1kit.tasks import get_task
    r1kit.save(tiny(), tiny_tok, tmp_path / "base")
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(OWN_GENERATION))
    task = get_task("arithmetic", digits=2, train_size=50, test_size=5)
    rows = [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": "<answer>1</answer>"}]}
            for p in task.problems("train", 8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(data=[str(tmp_path / "d.jsonl")], base=str(tmp_path / "base"), steps=1, batch_size=2, max_len=64,
                  eval_problems=0)
    sft.run(sft.SFTConfig(out_dir=str(tmp_path / "plain"), **common))
    assert _gen(tmp_path / "plain" / "model") == OWN_GENERATION
    sft.run(sft.SFTConfig(out_dir=str(tmp_path / "r1"), generation_config="r1", **common))
    assert _gen(tmp_path / "r1" / "model")["temperature"] == 0.6
    with pytest.raises(ConfigError, match="sft.generation_config = 'R1'"):
        sft.SFTConfig(generation_config="R1")


def test_grpo_option_is_checked():
    from r1kit.config import ConfigError
    from r1kit.stages.grpo import GRPOConfig
    assert GRPOConfig().generation_config == "source"
    with pytest.raises(ConfigError, match="grpo.generation_config = 'eval'; choose one of"):
        GRPOConfig(generation_config="eval")
