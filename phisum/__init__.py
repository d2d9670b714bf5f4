"""PhiSUM: LoRA/QLoRA fine-tuning, evaluation and a demo Space for small causal LMs."""

__version__ = "0.1.0"
