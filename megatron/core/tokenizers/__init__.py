"""Tokenizers: SentencePiece and Hugging Face `tokenizer.json` behind one interface, their typed
config and flags, and SentencePiece training (`tokenizer.py`)."""
