"""``python -m lora_lab demo``: train a LoRA on a small built-in model, no ComfyUI needed."""

import sys

from .demo.run import main

if __name__ == "__main__":
    sys.exit(main())
