"""Real-data slices shared by the training and guided-dropout tests."""

from tests.fixtures_data import bert_tokenizer, gpt2_no_dropout, gpt2_tokenizer, sst2_slice, wikitext_slice  # noqa: F401
