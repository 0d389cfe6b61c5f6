"""Building blocks shared by serving and finetuning: merged LoRA-aware linears with Hugging Face weight loaders,
paged attention, norms, rotary and activation. Each picks its Triton kernel or its PyTorch twin per call: the
kernel when the model runs on a GPU with the fast path on and no gradient is wanted, else the twin."""
