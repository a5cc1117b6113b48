"""Evaluation: perplexity/KL/copy on token data, model-level clip selection, benchmark clients."""
