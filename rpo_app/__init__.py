"""rpo_app: label preferences, fine-tune with LoRA + Relative Preference Optimization, chat."""

__version__ = "0.1.0"
