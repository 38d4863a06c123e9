"""python -m trainer: train a masked-diffusion LM (or its causal judge) and write checkpoints."""
