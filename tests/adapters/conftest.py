"""Real-data slices shared with the training tests."""

from tests.fixtures_data import bert_tokenizer, gpt2_tokenizer, sst2_slice, wikitext_slice  # noqa: F401
