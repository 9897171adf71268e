"""Hugging Face Trainer integration: NerveCallback and its options."""
