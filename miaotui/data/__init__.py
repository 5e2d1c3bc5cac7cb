"""Datasets, tokenizers and input feeds."""
