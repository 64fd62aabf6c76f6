"""Checkpoint tools: `convert.py` imports Hugging Face models and exports checkpoints to them."""
