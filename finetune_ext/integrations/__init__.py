"""The same training parts where users already train: Hugging Face ``Trainer`` (``integrations.transformers``)."""
