import pytest
import torch

torch.set_num_threads(1)  # two cores, several test processes at once in CI: keep each lean


@pytest.fixture(scope="session")
def tiny_tok():
    from r1kit.tokenizer import build_bpe_tokenizer
    corpus = ["1234+5678=<think>4+8+0=12</think><answer>6912</answer>",
              "The quick brown fox jumps over the lazy dog. 0123456789\n\n  indented"] * 20
    return build_bpe_tokenizer(corpus, vocab_size=320, style="deepseek-r1")
