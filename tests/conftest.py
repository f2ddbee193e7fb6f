import pytest
import torch

torch.set_num_threads(1)  # two cores, several test processes at once in CI: keep each lean


@pytest.fixture(scope="session")
def tiny_tok():
    from r1kit.tokenizer import build_bpe_tokenizer
    corpus = ["1234+5678=<think>4+8+0=12</think><answer>6912</answer>",
              "The quick brown fox jumps over the lazy dog. 0123456789\n\n  indented"] * 20
    return build_bpe_tokenizer(corpus, vocab_size=320, style="deepseek-r1")


@pytest.fixture()
def tiny_policy(tiny_tok):
    """A one-layer random Llama on tiny_tok, the 2-digit arithmetic task and its training problems."""
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.tasks import get_task
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256)
    task = get_task("arithmetic", digits=2, train_size=200, test_size=10)
    return Llama(cfg).init_weights(0), tiny_tok, task, task.problems("train")
