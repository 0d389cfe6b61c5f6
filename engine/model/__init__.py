"""Our own Llama-family decoder (Llama, Qwen2, Mistral) and its Hugging Face directory loader."""
