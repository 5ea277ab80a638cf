"""Evaluation: loss and perplexity, generation, and the text and classification metrics (the E2E ones included)."""
