"""Data-parallel scaling of the training loop: 1 to N processes with torch.distributed.

Each process trains the same run with ``batch_size`` b per process (so N processes train a
global batch of N x b, as ``torchrun`` would), on the built-in TinyUNet with synthetic
latents (no ComfyUI needed), and reports per step: wall time, the time spent in the
gradient all-reduce (the communication cost), and samples per second. gloo on CPU, NCCL on
GPUs (one per process).

    python benchmarks/bench_distributed.py --procs 1,2 --steps 30            # CPU, gloo
    python benchmarks/bench_distributed.py --device cuda --procs 1,2,4,8     # GPUs, NCCL

On a CPU machine the processes share the cores, so no speed-up is expected there: the
figure of interest is the all-reduce time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lora_lab.demo.models import TinyUNet  # noqa: E402
from lora_lab.training.config import TrainConfig  # noqa: E402
from lora_lab.training.distributed import World  # noqa: E402
from lora_lab.training.loop import train  # noqa: E402
from lora_lab.training.task import TorchTask, discrete_vp_sigmas  # noqa: E402

SIZES = {"small": dict(channels=32, size=16), "large": dict(channels=128, size=64)}


class TimedWorld(World):
    """A World that adds up the time of its gradient all-reduces."""

    spent = 0.0

    def sum_gradients(self, params):
        params = list(params)
        if params and params[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        super().sum_gradients(params)
        if params and params[0].is_cuda:
            torch.cuda.synchronize()
        TimedWorld.spent += time.perf_counter() - start


def _worker(rank, size, init, args, out):
    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads // size))
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if size > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                init_method=f"file://{init}", rank=rank, world_size=size)
    try:
        shape = SIZES[args.size]
        torch.manual_seed(0)
        network = TinyUNet(channels=shape["channels"], context_dim=32).eval().to(device)
        g = torch.Generator().manual_seed(0)
        count = max(8, args.batch * size * 2)
        latents = torch.randn(count, 4, shape["size"], shape["size"], generator=g)
        context = torch.randn(count, 8, 32, generator=g)
        task = TorchTask(network, "eps", discrete_vp_sigmas(), context, device=device)
        config = TrainConfig(steps=args.steps, batch_size=args.batch, training_dtype="fp32",
                             lora_dtype="fp32", gradient_checkpointing=False, rank=8)
        world = TimedWorld(rank, size)
        train(task, latents, TrainConfig(**{**config.__dict__, "steps": 2}), world=world)
        TimedWorld.spent = 0.0
        start = time.perf_counter()
        train(task, latents, config, world=world)
        elapsed = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"seconds": elapsed, "allreduce": TimedWorld.spent}, f)
    finally:
        if size > 1:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2", help="process counts (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2, help="batch per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads shared by the processes (default: all)")
    args = parser.parse_args()
    print(f"TinyUNet {args.size}, batch {args.batch} per process, {args.steps} steps, "
          f"{args.device}, torch {torch.__version__}")
    print("| processes | global batch | ms/step | all-reduce ms/step | samples/s |")
    print("|---|---|---|---|---|")
    for size in [int(p) for p in args.procs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(size, os.path.join(tmp, "init"), args, out), nprocs=size,
                     join=True)
            with open(out) as f:
                result = json.load(f)
        step = result["seconds"] / args.steps
        print(f"| {size} | {args.batch * size} | {step * 1e3:.1f} | "
              f"{result['allreduce'] / args.steps * 1e3:.2f} | "
              f"{args.batch * size / step:.1f} |")


if __name__ == "__main__":
    main()
