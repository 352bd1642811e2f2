"""Attacks that make adversarial prompts against the model under test (docs/methods.md 12)."""
