"""CPU-sized models of the real diffusers / transformers classes and their tokenizer (the embedded default)."""
