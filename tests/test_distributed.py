"""Data-parallel training with torch.distributed (gloo, CPU) on tiny real networks: W
processes with batch b give the LoRA of one process with batch W x b; a failing rank stops
the others with an error naming it."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from lora_lab.training.config import TrainConfig
from lora_lab.training.distributed import World
from lora_lab.training.loop import train
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
CASES = {
    # one size, 5 latents: epochs straddle steps; accumulation; EMA and warm-up
    "uniform": dict(count=5, options=dict(grad_accumulation_steps=2, ema_decay=0.9,
                                          warmup_steps=1, learning_rate=2e-3)),
    # three sizes of 3 latents: every bucket's last micro-batch splits unevenly
    "buckets": dict(count=9, options=dict(learning_rate=2e-3)),
}


def data(case):
    count = CASES[case]["count"]
    task, latents = make_task("unet", count=count)
    if case == "buckets":
        g = torch.Generator().manual_seed(1)
        latents = [torch.randn(3, 4, h, w, generator=g) for h, w in [(8, 8), (8, 12), (12, 8)]]
    return task, latents


def config(case, batch_size, **more):
    return TrainConfig(steps=4, batch_size=batch_size, **FP32, **CASES[case]["options"], **more)


class Failing:
    """Raises on its third forward (on the rank it is given to)."""

    def __init__(self, task):
        self.calls, predict = 0, task.predict

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("this rank's device fell over")
            return predict(*args, **kwargs)

        task.predict = failing


def _worker(rank, size, init_file, case, out_dir, fail_rank):
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    try:
        task, latents = data(case)
        if rank == fail_rank:
            Failing(task)
        try:
            result = train(task, latents, config(case, 2), world=World(rank, size))
            save_file(result.lora, os.path.join(out_dir, f"rank{rank}.safetensors"))
            outcome = "ok"
        except Exception as error:  # reported to the test through a file
            outcome = f"{type(error).__name__}: {error}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def run_two(tmp_path, case, fail_rank=-1):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), case, str(tmp_path), fail_rank),
             nprocs=2, join=True)
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_the_doubled_batch(case, tmp_path):
    from safetensors.torch import load_file

    assert run_two(tmp_path, case) == ["ok", "ok"]
    task, latents = data(case)
    single = train(task, latents, config(case, 4)).lora
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    scale = max(float(t.abs().max()) for t in single.values())  # the weights' scale
    for key, expected in single.items():
        for lora in ranks:
            assert float((lora[key] - expected).abs().max()) <= 1e-5 * scale, key
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single)  # ranks agree exactly


def test_a_failing_rank_stops_the_others_with_an_error_naming_it(tmp_path):
    outcomes = run_two(tmp_path, "uniform", fail_rank=1)
    assert outcomes[1] == "RuntimeError: this rank's device fell over"
    assert outcomes[0].startswith("RuntimeError: Rank 1 of 2 failed while computing step")
    assert not list(tmp_path.glob("*.safetensors"))  # nothing written


def test_shares_cover_a_micro_batch_in_order():
    for count in range(0, 9):
        for size in (1, 2, 3, 4):
            shares = [World(r, size).share(count) for r in range(size)]
            covered = [i for s in shares for i in range(count)[s]]
            assert covered == list(range(count))
            assert max(len(range(count)[s]) for s in shares) - \
                min(len(range(count)[s]) for s in shares) <= 1
