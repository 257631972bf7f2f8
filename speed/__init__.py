"""Speed and memory: the trainers' fast paths (LoRA, cached latents) and the benchmark that measures them."""
