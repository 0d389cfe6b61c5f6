"""coserve engine: a Llama-family decoder served with paged KV cache, continuous batching and multi-LoRA."""
