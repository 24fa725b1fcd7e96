"""minillm: distill large causal language models into small ones (MiniLLM, Gu et al. ICLR 2024)."""

__version__ = "0.1.0"
