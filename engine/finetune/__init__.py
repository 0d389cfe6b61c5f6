"""Token-level LoRA finetuning inside the engine's inference iterations."""
