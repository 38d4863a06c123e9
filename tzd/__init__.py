"""TZD core library: models, diffusion objective, sampler, checkpoints, tokenizer (torch; no HTTP)."""
