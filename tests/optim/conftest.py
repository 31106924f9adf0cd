"""Real-data slices shared with the training tests."""

from tests.fixtures_data import gpt2_tokenizer, wikitext_slice  # noqa: F401
