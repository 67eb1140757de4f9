"""Small built-in diffusion networks and the command-line demo that trains a LoRA on one."""
