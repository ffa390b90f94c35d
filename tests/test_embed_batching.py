"""Token-budget batching: texts sorted by length, batches bounded by padded tokens and
by ``MAX_BATCH_SIZE``, vectors back in input order and equal to unsorted encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forge.embedding.batching import token_batches
from forge.embedding.model import Embedder
from forge.errors import ConfigError
from forge.settings import Settings


def _padded_tokens(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=300), max_size=200),
    max_tokens=st.integers(min_value=1, max_value=4096),
    max_texts=st.integers(min_value=1, max_value=64),
)
def test_batches_cover_every_text_once_within_both_bounds(
    lengths: list[int], max_tokens: int, max_texts: int
) -> None:
    batches = token_batches(lengths, max_tokens=max_tokens, max_texts=max_texts)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_texts
        # Only a text longer than the budget on its own may exceed it, alone.
        assert _padded_tokens(batch, lengths) <= max_tokens or len(batch) == 1
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)


def test_short_texts_share_a_batch_that_long_ones_may_not() -> None:
    lengths = [10, 200, 10, 200, 10, 10]
    batches = token_batches(lengths, max_tokens=400, max_texts=4)
    assert batches == [[1, 3], [0, 2, 4, 5]]


def test_equal_lengths_keep_input_order() -> None:
    assert token_batches([5, 5, 5], max_tokens=100, max_texts=2) == [[0, 1], [2]]


def test_empty_input_has_no_batches() -> None:
    assert token_batches([], max_tokens=10, max_texts=10) == []


@pytest.mark.parametrize(("tokens", "texts"), [(0, 1), (1, 0)])
def test_rejects_non_positive_bounds(tokens: int, texts: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        token_batches([1], max_tokens=tokens, max_texts=texts)


def _texts() -> list[str]:
    words = ["vector", "search", "needs", "embeddings", "of", "every", "record", "in", "a", "set"]
    # Lengths from one word to long paragraphs, in no particular order.
    return [" ".join(words[: 1 + (i * 7) % 11] * (1 + (i * 5) % 9)) for i in range(40)]


def _with_budget(embedder: Embedder, batch_tokens: int) -> Embedder:
    return Embedder(
        embedder.model, name=embedder.name, version=embedder.version, batch_tokens=batch_tokens
    )


def test_encode_keeps_input_order_and_equals_unsorted_encoding(embedder: Embedder) -> None:
    texts = _texts()
    small = _with_budget(embedder, 96)
    batched = small.encode(texts, batch_size=8)
    # The unsorted reference: each text on its own, no padding, no reordering.
    reference = np.stack(
        [
            embedder.model.encode(
                [text], convert_to_numpy=True, normalize_embeddings=True, batch_size=1
            )[0]
            for text in texts
        ]
    )
    assert batched.dtype == np.float32
    np.testing.assert_allclose(batched, reference, atol=1e-5)


def test_encode_batches_respect_the_token_budget_and_the_batch_size(
    embedder: Embedder,
) -> None:
    texts = _texts()
    small = _with_budget(embedder, 96)
    lengths = small.token_lengths(texts)
    batches = small.batches(texts, batch_size=8)
    assert len(batches) > len(texts) // 8  # the budget, not only the count, split them
    for batch in batches:
        assert len(batch) <= 8
        assert _padded_tokens(batch, lengths) <= 96 or len(batch) == 1
    # Sorted across the whole call, not per fixed-size slice.
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)


def test_token_lengths_count_special_tokens_and_truncate(embedder: Embedder) -> None:
    short, long = embedder.token_lengths(["hello", "word " * 2000])
    assert short == 3  # [CLS] hello [SEP]
    assert long == embedder.model.max_seq_length


def test_embedder_rejects_a_non_positive_budget(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="batch_tokens"):
        _with_budget(embedder, 0)


def test_budget_is_a_setting() -> None:
    assert Settings.from_env({}).embed_batch_tokens == 4096
    assert Settings.from_env({"FORGE_EMBED_BATCH_TOKENS": "1024"}).embed_batch_tokens == 1024
    with pytest.raises(ConfigError, match="embed_batch_tokens"):
        Settings.from_env({"FORGE_EMBED_BATCH_TOKENS": "0"})
