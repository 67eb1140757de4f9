"""ComfyUI's attention functions in training: forward, and forward + backward, per call.

Train LoRA replaces ComfyUI's global attention for its training forwards where that one has
no fused backward (README, "Attention with a fused backward"). This measures why: for each
token count, ComfyUI's CPU choices (``attention_sub_quad``, ``attention_split``,
``attention_basic``) and ``attention_pytorch`` (PyTorch's scaled_dot_product_attention) on
random q, k, v of shape [batch 1, tokens, heads x dim_head] (SD1.x's first level: 8 heads of
40), median of ``--repeat`` timed calls after 2 untimed ones: a no-grad forward, and a
forward + backward of the output's sum with q, k, v requiring gradients. The largest
difference of each function's output from ``attention_pytorch``'s is printed too.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_EXTRA_PATH=/path/to/stubs \\
        /path/to/comfy-venv/bin/python benchmarks/bench_attention.py --tokens 256,1024,4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024,4096")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    from bench_step import call_times, setup_comfy

    setup_comfy("cpu")
    import torch

    import comfy.ldm.modules.attention as attention

    torch.set_num_threads(args.threads)
    names = [n for n in ("attention_sub_quad", "attention_split", "attention_basic",
                         "attention_pytorch") if hasattr(attention, n)]
    print(f"torch {torch.__version__}, {args.threads} threads, heads {args.heads} x "
          f"{args.dim_head}, ComfyUI's global attention: "
          f"{attention.optimized_attention.__name__}\n")
    print("| tokens | function | forward ms | forward + backward ms | max diff vs pytorch |")
    print("|---|---|---|---|---|")
    width = args.heads * args.dim_head
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, tokens, width, generator=g) for _ in range(3))
        with torch.no_grad():
            reference = attention.attention_pytorch(q, k, v, args.heads)
        for name in names:
            function = getattr(attention, name)
            with torch.no_grad():
                diff = (function(q, k, v, args.heads) - reference).abs().max().item()
                forward = statistics.median(
                    call_times(lambda: function(q, k, v, args.heads), args.repeat))
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            both = statistics.median(call_times(
                lambda: function(*leaves, args.heads).sum().backward(), args.repeat))
            print(f"| {tokens} | {name} | {forward:.1f} | {both:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
