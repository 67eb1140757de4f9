"""Time per optimizer step, step/forward ratio and peak memory of LoRA Lab training.

What is measured, for every cell of the matrix {bf16, fp32} x {checkpointing off, on}
(batch 1, grad accumulation 1, rank 8, alpha 1, AdamW, MSE, lora_dtype bf16 unless
``--lora-dtype``, 4 latents):

- **step ms**: the median wall time of one optimizer step. ``train()`` runs
  ``warmup + steps`` steps (default 3 + 10); a timestamp is taken in ``on_step`` after every
  step (after ``torch.cuda.synchronize()`` on CUDA) and the step times are the differences of
  consecutive timestamps, warm-up steps discarded.
- **forward ms**: the median of ``--forwards`` (default 10: half right before ``train()``,
  half right after it, each block after 2 untimed) no-grad forwards of the same batch (batch 1: one noised latent, its sigma and its conditioning, drawn as the
  loop draws them) through ``task.predict`` under ``torch.no_grad()`` and the same autocast
  as training (bf16 autocast for training_dtype bf16, none for fp32), with no adapters
  installed: the plain network forward a training step is compared with.
- **fwd+LoRA ms**: the same forward with the trained adapters installed (the forward half of
  a training step, without autograd).
- **step/forward**: step ms / forward ms. A frozen base model needs only input gradients, so
  a step is ideally about one forward + one backward (~2x forward) plus the adapters and the
  optimizer; with checkpointing one more forward is recomputed.
- **sampler fwd ms**, **step/sampler fwd**: the same forward as a sampler runs it, under
  ``torch.inference_mode()`` on a plain model: for the comfy backend a fresh ``clone()`` of
  the model patcher loaded without the task's weight wrappers (``ComfyTask`` installs
  identity weight wrappers so that ComfyUI copies its inference-mode weights into normal
  tensors on every layer call; those copies are part of **forward ms**, not of this one),
  called through ``BaseModel.apply_model``; for the torch backend ``task.predict``. Its
  ratio is the training cost relative to generating with the model.
- **peak MiB**:
  - ``--device cpu``: the peak *RSS growth* of the process during ``train()``: the kernel's
    high-water mark ``VmHWM`` is reset to the current RSS (``echo 5 > /proc/self/clear_refs``)
    right before ``train()`` (after ``gc.collect()`` and glibc ``malloc_trim(0)``, which hands
    freed heap memory back, so memory freed earlier is not silently reused), and
    ``VmHWM - VmRSS_before`` is read right after. It counts
    everything training adds to the resident memory (activations, adapters, optimizer state,
    gradient buffers, allocator slack), not the model weights that were already loaded. If
    ``clear_refs`` is not writable, a thread samples ``VmRSS`` every 2 ms instead.
  - ``--device cuda``: ``torch.cuda.max_memory_allocated()`` during ``train()`` (peak stats
    reset right before it), which includes the weights; the growth over
    ``memory_allocated()`` before ``train()`` is shown in parentheses.

- **expected MiB**: what a step must keep, measured on one extra 1-step run with
  ``torch.autograd.graph.saved_tensors_hooks``: the bytes of every tensor autograd saves for
  backward that is not one of the model's own weights (so a weight copy or cast kept for
  backward would show here), plus the adapters' state (fp32 master weights, gradients and
  AdamW's two moments, 16 bytes per parameter). What is saved while backward runs (a
  checkpointed block's recomputation, freed when that block's backward ends) counts as the
  largest such block. Peak growth well above it is allocator slack and transient buffers.

Each cell runs in its own subprocess (``--cell``), so the memory of one cell, allocator
caches and warm-up state do not leak into the next. Every cell is run ``--repeat`` times
(default 3, round-robin over the cells) and the table shows, per cell, the median over the
runs of each run's median times and of each run's ratios (small shared VMs drift by 20% and
more from one minute to the next; a ratio taken inside one process is far steadier than an
absolute time). The CPUs that other processes kept busy during each run are measured from
``/proc/stat`` and printed; ``--wait-idle`` and ``--retry-busy`` help on a shared machine. On CPU ``torch.set_num_threads`` is set
to ``--threads`` (default: the CPUs this process may run on) in every cell.

Backends:

- ``--backend torch`` (default): plain PyTorch, ``lora_lab.training.task.TorchTask`` over
  ``lora_lab.demo.models.TinyUNet(in_channels=4, channels=128, mults=(1, 2, 4),
  context_dim=768, heads=8, depth=1)`` (40.4M parameters, SD1.x-like eps UNet with
  attention at every level), latents 4x32x32, context [77, 768] per sample.
- ``--backend comfy --model sd15|sd3``: a real ComfyUI model patcher from
  ``tests/comfyui/tiny_models.py`` (``medium=True``: SD1.x UNet 44M, latent 4x16x16,
  context [77, 768]; SD3 MMDiT 31M, latent 16x32x32, context [8, 256] + pooled [128]),
  trained through ``lora_lab.nodes.bridge.ComfyTask`` as the Train LoRA node does: model
  built under ``torch.inference_mode()``, the task built and trained on a ``clone()`` inside
  ``torch.inference_mode(False)``. Needs ``COMFYUI_DIR`` (a ComfyUI checkout) and, where
  ComfyUI's imports need them, ``COMFYUI_EXTRA_PATH`` (colon-separated dirs put on
  ``sys.path``, e.g. a torchvision stand-in), and must run with ComfyUI's Python.

``--vs-core`` (comfy backend): LoRA Lab's Train LoRA node and ComfyUI core's
``TrainLoraNode`` on the same tiny ComfyUI model, latents, conditioning and settings (batch
1, rank 8, AdamW, lr 1e-4, lora_dtype bf16, LoRA), called as the executor calls them, in
one process. Per-step time is the marginal time of ``--steps`` more steps: (time of a
``warmup + steps``-step run - time of a ``warmup``-step run) / ``steps``, which removes
each node's fixed setup (after one untimed run of each node per cell; each cell in a process
of its own); in every round the four runs alternate between the nodes
(A B A B, then B A B A in the next round) so a slow phase of the machine hits both. The
table gives the medians over ``--repeat`` rounds of each node's ms/step and of the per-round
ratio, the sampler forward of the model (``apply_model`` under inference mode on a loaded
plain clone, batch 1), the step in such forwards, and the same sampler forward on
Train LoRA's ``model_with_lora`` (ComfyUI merges the LoRA into the weights when loading it).

Usage (from the repository root)::

    python benchmarks/bench_step.py                       # torch backend, CPU
    python benchmarks/bench_step.py --device cuda
    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_EXTRA_PATH=/path/to/stubs \\
        /path/to/comfy-venv/bin/python benchmarks/bench_step.py --backend comfy --model sd15
    python benchmarks/bench_step.py --dtypes bf16 --checkpointing off --profile 25

``--json FILE`` also writes the raw results (every step and forward time). ``--profile N``
prints, per cell, torch.profiler's N most expensive ops (by self CPU time; by CUDA time on
CUDA) over 3 extra training steps, to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

BUSY = 0.25  # CPUs used by other processes above which a cell's timings are flagged
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lora_lab_bench"  # the name the pack is imported under for the comfy backend

RANK = 8
LATENTS = 4
LORA_DTYPE = "bf16"  # the adapters' dtype unless --lora-dtype says otherwise


# -- memory ------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class RssPeak:
    """Peak RSS growth (MiB) over a ``with`` block, on Linux."""

    def __enter__(self) -> "RssPeak":
        self.method = "VmHWM"
        self.before = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            hwm = _status_kib("VmHWM")
            if hwm is None or self.before is None or hwm > self.before + 1024:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "sampled VmRSS"
            self._peak = self.before or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kib("VmRSS") or 0)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM") or 0
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _status_kib("VmRSS") or 0)
        self.growth_mib = (peak - (self.before or 0)) / 1024


# -- backends: (model name, parameter count, task, latents, training API) -----------------
def build_torch(device: str):
    import torch

    from lora_lab.demo.models import TinyUNet
    from lora_lab.lora.inject import ForwardPatches, adapter_patches
    from lora_lab.losses.objective import Objective
    from lora_lab.training.config import TrainConfig
    from lora_lab.training.loop import train
    from lora_lab.training.task import TorchTask, discrete_vp_sigmas

    torch.manual_seed(0)
    network = TinyUNet(in_channels=4, channels=128, context_dim=768, mults=(1, 2, 4),
                       heads=8, depth=1).to(device).eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(LATENTS, 4, 32, 32, generator=g)
    context = torch.randn(LATENTS, 77, 768, generator=g)
    task = TorchTask(network, "eps", discrete_vp_sigmas(), context, device=device)
    params = sum(p.numel() for p in network.parameters())
    api = dict(train=train, TrainConfig=TrainConfig, ForwardPatches=ForwardPatches,
               adapter_patches=adapter_patches, Objective=Objective)
    api["sampler_session"] = contextlib.nullcontext
    api["sampler_predict"] = task.predict
    return "TinyUNet 128x(1,2,4)", params, task, latents, api, lambda f: f()


def setup_comfy(device: str):
    """Put ComfyUI on sys.path as its tests do and import the pack as ComfyUI imports it."""
    import importlib.util

    comfy_dir = os.environ.get("COMFYUI_DIR", "").strip()
    if not comfy_dir or not os.path.exists(os.path.join(comfy_dir, "comfy", "model_management.py")):
        sys.exit("--backend comfy needs COMFYUI_DIR set to a ComfyUI checkout.")
    extra = [p for p in os.environ.get("COMFYUI_EXTRA_PATH", "").split(os.pathsep) if p]
    for path in [os.path.abspath(comfy_dir), *map(os.path.abspath, extra),
                 os.path.join(REPO, "tests", "comfyui")][::-1]:
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.options  # noqa: F401
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"  # before comfy.model_management is imported
    import utils.extra_config  # noqa: F401  (ComfyUI's main imports it before nodes)

    spec = importlib.util.spec_from_file_location(
        PACKAGE, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pack
    spec.loader.exec_module(pack)


def comfy_model(name: str, latent_size: int = 0) -> tuple:
    """``comfy_models()[name]``, with the latent's height and width set to ``latent_size``
    when it is not 0 (``--latent-size``)."""
    build, cond, shape = comfy_models()[name]
    if latent_size:
        shape = shape[:-2] + (latent_size, latent_size)
    return build, cond, shape


def comfy_models() -> dict:
    """``--model`` name -> (builder(seed) -> ModelPatcher, conditioning(seed), latent shape).

    ``sd15`` / ``sd3``: the tiny "medium" test models. ``sd15_full``: SD1.5's UNet at full
    size (860M parameters: channel_mult 1, 2, 4, 4, two res blocks per level, attention on
    the first three levels), latent 4x64x64 (512 px). ``dit_1b``: an SD3 MMDiT of depth 19
    (hidden 1216, 19 heads, 1.0B parameters), latent 16x64x64. All random-init and
    detected by ComfyUI as SD15 / SD3 (meant for a GPU; on CPU a step takes minutes).
    """
    import functools

    import torch
    import tiny_models

    def full_sd15(seed=0):
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        config = dict(tiny_models.sd15_unet_config(), num_res_blocks=[2, 2, 2, 2],
                      channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                      transformer_depth_middle=1)
        with torch.device("meta"):
            net = UNetModel(**config, operations=comfy.ops.disable_weight_init)
        return tiny_models._load(tiny_models._fill_state_dict(net, seed))

    def dit(seed=0, depth=19, pos=32):
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

        config = dict(tiny_models.sd3_mmdit_config(), depth=depth, pos_embed_max_size=pos,
                      num_patches=pos * pos)
        config["context_embedder_config"] = {"target": "torch.nn.Linear", "params": {
            "in_features": tiny_models.SD3_CONTEXT_DIM, "out_features": 64 * depth}}
        with torch.device("meta"):
            net = MMDiT(**config, operations=comfy.ops.disable_weight_init)
        return tiny_models._load(tiny_models._fill_state_dict(net, seed))

    return {
        "sd15": (functools.partial(tiny_models.tiny_sd15, medium=True), tiny_models.sd15_cond,
                 (LATENTS, 4, 16, 16)),
        "sd3": (functools.partial(tiny_models.tiny_sd3, medium=True), tiny_models.sd3_cond,
                (LATENTS, 16, 32, 32)),
        "sd15_full": (full_sd15, tiny_models.sd15_cond, (LATENTS, 4, 64, 64)),
        "dit_1b": (dit, tiny_models.sd3_cond, (LATENTS, 16, 64, 64)),
    }


def build_comfy(device: str, model: str, training_dtype: str, latent_size: int = 0):
    import importlib

    import torch

    setup_comfy(device)

    bridge = importlib.import_module(f"{PACKAGE}.nodes.bridge")
    loop = importlib.import_module(f"{PACKAGE}.training.loop")
    config = importlib.import_module(f"{PACKAGE}.training.config")
    inject = importlib.import_module(f"{PACKAGE}.lora.inject")

    build, cond, shape = comfy_model(model, latent_size)
    with torch.inference_mode():  # as ComfyUI loads models and runs nodes
        patcher = build(seed=0)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        positive = cond(seed=3)
    with torch.inference_mode(False):
        try:  # as the Train LoRA node builds it
            task = bridge.ComfyTask(patcher.clone(), positive, latents, training_dtype)
        except TypeError:  # a ComfyTask without the training_dtype argument
            task = bridge.ComfyTask(patcher.clone(), positive, latents)
    params = sum(p.numel() for p in task.network.parameters())
    objective = importlib.import_module(f"{PACKAGE}.losses.objective")
    api = dict(train=loop.train, TrainConfig=config.TrainConfig,
               ForwardPatches=inject.ForwardPatches, adapter_patches=inject.adapter_patches,
               Objective=objective.Objective)
    name = {"sd15": "ComfyUI SD1.x UNet (tiny medium)", "sd3": "ComfyUI SD3 MMDiT (tiny medium)",
            "sd15_full": "ComfyUI SD1.5 UNet (full size)", "dit_1b": "ComfyUI SD3 MMDiT depth 19"}

    @contextlib.contextmanager
    def sampler_session():
        """A plain clone of the model loaded as for sampling: no weight wrappers, no patches."""
        import comfy.model_management

        plain = patcher.clone()
        comfy.model_management.load_models_gpu([plain], force_full_load=True)
        try:
            state["plain"] = plain
            yield
        finally:
            bridge.release(plain)

    def sampler_predict(x_t, sigma, samples):
        import comfy.samplers

        kwargs = comfy.samplers.cond_cat([task.sample_conds[int(i)] for i in samples])
        return state["plain"].model.apply_model(x_t, sigma, **kwargs)

    state = {}
    api["sampler_session"], api["sampler_predict"] = sampler_session, sampler_predict
    return name[model], params, task, latents, api, run_outside_inference


def run_outside_inference(f):
    import torch

    with torch.inference_mode(False):
        return f()


def call_times(call, count: int, sync=lambda: None, untimed: int = 2) -> list[float]:
    """Milliseconds of ``count`` calls of ``call`` after ``untimed`` ones, ``sync`` (a
    device synchronisation) before and after each."""
    times = []
    for i in range(untimed + count):
        sync()
        start = time.perf_counter()
        call()
        sync()
        if i >= untimed:
            times.append((time.perf_counter() - start) * 1e3)
    return times


# -- one cell ----------------------------------------------------------------------------
def run_cell(args) -> dict:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.backend == "torch":
        model, params, task, latents, api, wrap = build_torch(args.device)
    else:
        model, params, task, latents, api, wrap = build_comfy(args.device, args.model, args.dtype,
                                                              args.latent_size)
    dtype, ckpt = args.dtype, args.checkpointing == "on"
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = api["TrainConfig"](
        batch_size=1, grad_accumulation_steps=1, steps=args.warmup + args.steps,
        learning_rate=1e-4, rank=RANK, alpha=1.0, optimizer="AdamW", loss_function="MSE",
        seed=0, training_dtype=dtype, lora_dtype=args.lora_dtype, algorithm="LoRA",
        gradient_checkpointing=ckpt)

    stamps: list[float] = []

    def on_step(report):
        sync()
        stamps.append(time.perf_counter())

    def train():
        return api["train"](task, latents, config, on_step=on_step)

    def forwards(adapters, count: int, sampler: bool = False, untimed: int = 2) -> list[float]:
        """``count`` timed no-grad forwards (after ``untimed`` ones) of one batch-1 sample,
        drawn as the training loop draws it.

        ``sampler``: through a plain clone under ``torch.inference_mode`` instead (what a
        sampler's forward costs: no weight wrappers, no patches, no autograd bookkeeping)."""
        g = torch.Generator().manual_seed(1)
        dataset = task.prepare_latents(latents.clone()).float().cpu()
        samples = torch.tensor([0])
        x0 = dataset[samples].to(task.device)
        noise = torch.randn(x0.shape, generator=g).to(task.device)
        sigma = api["Objective"](task, api["TrainConfig"]()).sample_sigmas(1, g).to(task.device)
        x_t = task.add_noise(x0, noise, sigma)
        patches = api["ForwardPatches"](api["adapter_patches"](task.network, adapters))
        if sampler:
            grad_mode, session, predict = torch.inference_mode(), api["sampler_session"](), \
                api["sampler_predict"]
        else:
            grad_mode, session, predict = torch.no_grad(), task.session(patches), task.predict
        with grad_mode, session, torch.autocast(
                task.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return call_times(lambda: predict(x_t, sigma, samples), count, sync, untimed)

    # Forwards in two blocks, before and after training, so that a slow or fast phase of the
    # machine affects both sides of the ratio alike.
    first = args.forwards // 2
    base_ms = wrap(lambda: forwards({}, first))
    sampler_ms = forwards({}, first, sampler=True)

    import gc

    gc.collect()
    try:  # give freed heap memory back, so RSS growth counts all memory training touches
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = wrap(train)
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory = dict(peak_mib=peak, growth_mib=peak - before / 2**20,
                      method="cuda max_memory_allocated")
    else:
        with RssPeak() as rss:
            result = wrap(train)
        memory = dict(peak_mib=rss.growth_mib, growth_mib=rss.growth_mib,
                      method=f"RSS growth ({rss.method})")
    step_ms = [(b - a) * 1e3 for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    base_ms += wrap(lambda: forwards({}, args.forwards - first))
    sampler_ms += forwards({}, args.forwards - first, sampler=True)
    lora_ms = wrap(lambda: forwards(result.adapters, args.forwards))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        short = dataclasses.replace(config, steps=3)
        shapes = args.profile_shapes
        with profile(activities=activities, record_shapes=shapes) as prof:
            wrap(lambda: api["train"](task, latents, short))
        averages = prof.key_averages(group_by_input_shape=shapes)
        try:
            table = averages.table(sort_by="self_device_time_total" if cuda else
                                   "self_cpu_time_total", row_limit=args.profile)
        except (KeyError, AttributeError):  # torch before the device_time names
            table = averages.table(sort_by="self_cuda_time_total" if cuda else
                                   "self_cpu_time_total", row_limit=args.profile)
        print(f"\n### profile: {model} {dtype} checkpointing {args.checkpointing} "
              f"(3 steps)\n{table}", file=sys.stderr)

    expected = wrap(lambda: expected_memory(task, latents, config, result.adapters, api))
    flops = wrap(lambda: step_flops(
        lambda: forwards({}, 1, untimed=0),
        lambda steps: api["train"](task, latents, dataclasses.replace(config, steps=steps))))
    step, fwd, plain = (statistics.median(t) for t in (step_ms, base_ms, sampler_ms))
    return dict(model=model, params=params, dtype=dtype, checkpointing=args.checkpointing,
                step_ms=step, forward_ms=fwd, lora_forward_ms=statistics.median(lora_ms),
                ratio=step / fwd, sampler_forward_ms=plain, sampler_ratio=step / plain,
                memory=memory, expected_mib=expected, flops=flops, step_times_ms=step_ms, sampler_forward_times_ms=sampler_ms,
                forward_times_ms=base_ms, lora_forward_times_ms=lora_ms,
                losses=result.losses)


def step_flops(forward, train) -> dict:
    """The matrix work (products, convolutions and attention, as torch's ``FlopCounterMode``
    counts them) of one no-grad forward and of one optimizer step on the same sample (a
    2-step run's minus a 1-step run's, which removes a run's own evaluations). Their ratio is
    what a step would cost in forwards if every product ran as fast as the forward's: a
    step's floor, set by the model's sizes and the adapters' rank. ``train(steps)`` runs."""
    import torch
    from torch.utils import flop_counter

    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    # CPU's fused attention kernels, not in torch's table: the same work as the CUDA ones
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: attention,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward:
                         attention_backward}
    totals = []
    for call in (forward, lambda: train(1), lambda: train(2)):
        with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as mode:
            call()
        totals.append(mode.get_total_flops())
    step = totals[2] - totals[1]
    return dict(forward_gflop=totals[0] / 1e9, step_gflop=step / 1e9,
                ratio=step / max(totals[0], 1))


def expected_memory(task, latents, config, adapters, api) -> dict:
    """What a step must keep, in MiB: the tensors autograd saves for backward during one
    optimizer step that are not the model's own weights (activations; a saved weight copy
    or cast would count here), and the adapters' state (float32 master weights, their
    gradients and AdamW's two moments: 4 x 4 bytes per parameter). Tensors saved while
    backward runs (a checkpointed block's recomputation, freed once that block is done) count
    as the largest such block, not their sum."""
    import torch

    weights = {t.untyped_storage().data_ptr()
               for t in list(task.network.parameters()) + list(task.network.buffers())}
    saved: dict[object, dict[int, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            node = torch._C._current_autograd_node()  # None in forward
            bucket = saved.setdefault(None if node is None else id(node), {})
            bucket[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        api["train"](task, latents, dataclasses.replace(config, steps=1))
    count = sum(p.numel() for a in adapters.values() for p in a.parameters())
    forward = sum(saved.get(None, {}).values())
    recompute = max((sum(b.values()) for k, b in saved.items() if k is not None), default=0)
    return dict(saved_mib=(forward + recompute) / 2**20, adapter_state_mib=count * 16 / 2**20)


# -- against core's TrainLoraNode, in one process -------------------------------------------
def run_vs_core(args) -> dict:
    """LoRA Lab's Train LoRA node and ComfyUI core's TrainLoraNode on the same model, data and
    settings, interleaved in one process (see ``--vs-core`` in the module docstring): the
    row of the cell ``args.dtype``, ``args.checkpointing``."""
    import tempfile

    import torch

    setup_comfy(args.device)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy.sd
    from safetensors.torch import save_file

    build, cond, shape = comfy_model(args.model, args.latent_size)

    folder = tempfile.mkdtemp(prefix="lora_lab_vs_core_")
    path = os.path.join(folder, f"{args.model}.safetensors")
    with torch.inference_mode():
        built = build(seed=0)
        save_file({k: v.contiguous() for k, v in built.model.diffusion_model.state_dict().items()},
                  path)
        del built
        # loaded from a file as Load Diffusion Model does (core's trainer on ComfyUI 0.33
        # rebuilds the model from the loader's recorded factory, which reads the file again)
        options = {} if args.weight_dtype == "fp32" else {
            "dtype": {"bf16": torch.bfloat16, "fp16": torch.float16}[args.weight_dtype]}
        model = comfy.sd.load_diffusion_model(path, model_options=options)
    try:
        return vs_core_row(args, model, shape, cond)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def vs_core_row(args, model, shape, cond) -> dict:
    """``run_vs_core``'s cell on the loaded ``model``."""
    import gc
    import importlib

    import torch
    import comfy.model_management
    import comfy.samplers
    from bench_quality import node_values, run_node
    from comfy_extras.nodes_train import TrainLoraNode

    TrainLoRA = importlib.import_module(f"{PACKAGE}.nodes.train").TrainLoRA
    bridge = importlib.import_module(f"{PACKAGE}.nodes.bridge")
    with torch.inference_mode():
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        positive = cond(seed=3)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(node, dtype: str, ckpt: str, steps: int):
        values = node_values(node, dict(
            model=model, latents={"samples": latents}, positive=positive, batch_size=1,
            grad_accumulation_steps=1, steps=steps, learning_rate=1e-4, rank=RANK,
            optimizer="AdamW", loss_function="MSE", seed=0, training_dtype=dtype,
            lora_dtype=args.lora_dtype, algorithm="LoRA", gradient_checkpointing=ckpt == "on",
            existing_lora="[None]"))
        cuda = args.device == "cuda"
        gc.collect()  # the last run's models and LoRAs, before this one allocates its own
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        outputs = run_node(node, values)
        sync()
        elapsed = time.perf_counter() - start
        if cuda:
            peaks.setdefault(node, []).append(torch.cuda.max_memory_allocated() / 2**20)
        return elapsed, outputs

    def sampler_ms(patcher, dtype: str, count: int) -> float:
        """Median ``apply_model`` of one batch-1 sample under inference mode, as a sampler."""
        with torch.inference_mode(False):
            task = bridge.ComfyTask(patcher.clone(), positive, latents[:1], dtype)
        x = latents[:1].clone()
        sigma = torch.tensor([5.0])
        kwargs = comfy.samplers.cond_cat([task.sample_conds[0]])
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16,
                                                    enabled=dtype == "bf16"):
            return statistics.median(call_times(
                lambda: patcher.model.apply_model(x, sigma, **kwargs), count, sync))

    short, long = args.warmup, args.warmup + args.steps
    dtype, ckpt = args.dtype, args.checkpointing
    lab, core, ratios, trained, peaks = [], [], [], None, {}
    for node in (TrainLoRA, TrainLoraNode):  # untimed: one-time costs of each node
        timed(node, dtype, ckpt, short)
    for r in range(args.repeat):
        order = [TrainLoRA, TrainLoraNode] if r % 2 == 0 else [TrainLoraNode, TrainLoRA]
        seconds = {}
        for steps in (short, long):
            for node in order:
                elapsed, outputs = timed(node, dtype, ckpt, steps)
                seconds[node, steps] = elapsed
                if node is TrainLoRA:
                    trained = outputs[0]
        per_step = {node: (seconds[node, long] - seconds[node, short]) / args.steps * 1e3
                    for node in order}
        lab.append(per_step[TrainLoRA])
        core.append(per_step[TrainLoraNode])
        ratios.append(per_step[TrainLoRA] / per_step[TrainLoraNode])
    base_fwd = sampler_ms(model, dtype, args.forwards)
    lora_fwd = sampler_ms(trained, dtype, args.forwards)
    step = statistics.median(lab)
    return dict(model=args.model, weights=args.weight_dtype, dtype=dtype, checkpointing=ckpt,
                lab_step_ms=step, core_step_ms=statistics.median(core),
                ratio=statistics.median(ratios), ratios=ratios,
                sampler_forward_ms=base_fwd, step_per_sampler_forward=step / base_fwd,
                lora_sampler_forward_ms=lora_fwd, lab_ms=lab, core_ms=core,
                lab_peak_mib=max(peaks.get(TrainLoRA, [0])),
                core_peak_mib=max(peaks.get(TrainLoraNode, [0])))


# -- driver ------------------------------------------------------------------------------
def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, steal included)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(limit_s: float, threshold: float = 0.2, window_s: float = 3.0) -> float:
    """Wait (up to ``limit_s``) for a ``window_s`` window in which the machine's busy CPUs
    stay under ``threshold``; returns the load of the last window."""
    deadline = time.perf_counter() + limit_s
    while True:
        busy0 = busy_cpu_seconds()
        if busy0 is None:
            return 0.0
        time.sleep(window_s)
        load = (busy_cpu_seconds() - busy0) / window_s
        if load < threshold or time.perf_counter() > deadline:
            return load


def cell_command(args, *flags: str) -> list[str]:
    """This script run as a subprocess with ``args``' settings and ``flags``."""
    return [sys.executable, os.path.abspath(__file__), "--cell", *flags,
            "--backend", args.backend, "--model", args.model, "--device", args.device,
            "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--forwards", str(args.forwards), "--threads", str(args.threads),
            "--lora-dtype", args.lora_dtype, "--latent-size", str(args.latent_size)]


def run_result(command: list[str], what: str) -> dict:
    """Run ``command``; the ``RESULT`` json it printed last (exits with its output if none)."""
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n" + proc.stdout[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def run_vs_core_process(args, dtype: str, ckpt: str) -> dict:
    """One ``--vs-core`` cell in its own process (a full-size model and the models core's
    trainer builds would pile up over the cells in one), as its row."""
    command = cell_command(args, "--vs-core", "--dtype", dtype, "--checkpointing", ckpt,
                           "--repeat", str(args.repeat), "--weight-dtype", args.weight_dtype)
    return run_result(command, f"--vs-core cell {dtype}/checkpointing {ckpt}")


def run_cell_process(args, dtype: str, ckpt: str) -> dict:
    """Run one cell in a subprocess; its result, with the other processes' CPU load."""
    command = cell_command(args, "--dtype", dtype, "--checkpointing", ckpt,
                           "--profile", str(args.profile)) + (
        ["--profile-shapes"] if args.profile_shapes else [])
    if args.wait_idle > 0:
        wait_until_idle(args.wait_idle)
    t0, busy0, own0 = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    result = run_result(command, f"cell {dtype}/checkpointing {ckpt}")
    wall, busy1 = time.perf_counter() - t0, busy_cpu_seconds()
    # CPUs kept busy by other processes while the cell ran: timings are only comparable
    # when this is ~0 (a shared or busy machine slows every number down).
    result["other_load_cpus"] = (
        0.0 if busy0 is None else
        max(0.0, (busy1 - busy0) - (children_cpu_seconds() - own0)) / wall)
    print(f"[{dtype}, checkpointing {ckpt}: {wall:.0f} s] step {result['step_ms']:.1f} ms, "
          f"forward {result['forward_ms']:.1f} ms, other processes' load "
          f"{result['other_load_cpus']:.2f} CPUs", file=sys.stderr, flush=True)
    return result


def combine(runs: list[dict]) -> dict:
    """One row from the repeated runs of a cell: medians over the runs (of each run's median
    time; of each run's ratio); every run is kept under ``runs``."""
    row = dict(runs[0])
    for key in ("step_ms", "forward_ms", "lora_forward_ms", "ratio", "sampler_forward_ms",
                "sampler_ratio"):
        row[key] = statistics.median(r[key] for r in runs)
    row["memory"] = dict(runs[0]["memory"], **{
        key: statistics.median(r["memory"][key] for r in runs)
        for key in ("peak_mib", "growth_mib")})
    row["other_load_cpus"] = max(r["other_load_cpus"] for r in runs)
    row["runs"] = runs
    return row


def machine(args) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, text=True,
                                capture_output=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    line = (f"LoRA Lab {commit}, torch {torch.__version__}, Python {platform.python_version()}, {cpu}, "
            f"{os.cpu_count()} CPUs")
    if args.device == "cpu":
        line += (f", {args.threads} torch threads, CPU capability "
                 f"{torch.backends.cpu.get_cpu_capability()}")
    elif torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name()}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "comfy"], default="torch")
    parser.add_argument("--model", choices=["sd15", "sd3", "sd15_full", "dit_1b"], default="sd15",
                        help="the tiny ComfyUI model (comfy backend only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16,fp32")
    parser.add_argument("--checkpointing", default="off,on", help="comma-separated: off,on")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps (discarded)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--forwards", type=int, default=10, help="measured forwards")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every cell (each in a fresh process, round-robin over "
                             "the cells); the table shows the medians over the runs")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads on CPU (default: the usable CPUs)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive ops of 3 extra steps per cell")
    parser.add_argument("--profile-shapes", action="store_true",
                        help="--profile: one row per op and input shapes")
    parser.add_argument("--lora-dtype", choices=["bf16", "fp32", "fp16"], default=LORA_DTYPE,
                        help="the adapters' dtype (lora_dtype), in every cell and --vs-core")
    parser.add_argument("--latent-size", type=int, default=0, metavar="N",
                        help="comfy backend: latents of N x N instead of the model's default "
                             "(e.g. 32 for dit_1b on a CPU: 256 tokens instead of 1024)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each cell, wait up to S seconds for the machine to be "
                             "idle (other processes using < 0.2 CPUs for 3 s)")
    parser.add_argument("--retry-busy", type=int, default=0, metavar="K",
                        help="rerun a cell up to K times while other processes kept more "
                             f"than {BUSY} CPUs busy during it; the least disturbed run is kept")
    parser.add_argument("--vs-core", action="store_true",
                        help="time Train LoRA against ComfyUI core's TrainLoraNode on the same "
                             "ComfyUI model, interleaved in one process (needs COMFYUI_DIR)")
    parser.add_argument("--weight-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="--vs-core: the dtype the model's weights are stored in (as "
                             "Load Diffusion Model's weight_dtype sets it)")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time includes setup)")
    if min(args.steps, args.forwards, args.repeat) < 1:
        parser.error("--steps, --forwards and --repeat must be at least 1")

    if args.cell:  # one cell, in a subprocess: print its result as the last line
        result = run_vs_core(args) if args.vs_core else run_cell(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.vs_core:
        started = time.perf_counter()
        rows = []
        for dtype in args.dtypes.split(","):
            for ckpt in args.checkpointing.split(","):
                rows.append(run_vs_core_process(args, dtype, ckpt))
                r = rows[-1]
                print(f"[{dtype}, checkpointing {ckpt}] Train LoRA {r['lab_step_ms']:.1f} ms/step,"
                      f" core {r['core_step_ms']:.1f}, ratio {r['ratio']:.2f}, sampler forward "
                      f"{r['sampler_forward_ms']:.1f} ms", flush=True)
                if args.json:  # after every cell: a later cell that fails loses only itself
                    with open(args.json, "w") as f:
                        json.dump(dict(machine=machine(args), args=vars(args), rows=rows), f,
                                  indent=1)
        print(f"\nmachine: {machine(args)}")
        latent = f", latents {args.latent_size}x{args.latent_size}" if args.latent_size else ""
        print(f"ComfyUI {args.model}{latent}, weights stored {args.weight_dtype}, batch 1, rank {RANK}, AdamW, lora_dtype {args.lora_dtype}; "
              f"per-step time = (time of a {args.warmup + args.steps}-step run - time of a "
              f"{args.warmup}-step run) / {args.steps} after an untimed run of each node, "
              f"each node run in turn, {args.repeat} "
              f"rounds, medians; total {time.perf_counter() - started:.0f} s\n")
        print("| model | dtype | checkpointing | Train LoRA ms/step | core TrainLoraNode ms/step "
              "| ratio (per round) | sampler fwd ms | step/sampler fwd | model_with_lora "
              "sampler fwd ms | peak VRAM MiB (Train LoRA / core) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            each = " / ".join(f"{v:.2f}" for v in r["ratios"])
            print(f"| {r['model']} | {r['dtype']} | {r['checkpointing']} | {r['lab_step_ms']:.1f} "
                  f"| {r['core_step_ms']:.1f} | {r['ratio']:.2f} ({each}) "
                  f"| {r['sampler_forward_ms']:.1f} | {r['step_per_sampler_forward']:.2f} "
                  f"| {r['lora_sampler_forward_ms']:.1f} "
                  f"| {r['lab_peak_mib']:.0f} / {r['core_peak_mib']:.0f} |")
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    cells = [(d, c) for d in args.dtypes.split(",") for c in args.checkpointing.split(",")]
    results = []
    started = time.perf_counter()
    runs: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    for _ in range(args.repeat):  # round-robin, so a slow phase of the machine hits all cells
        for dtype, ckpt in cells:
            best = None
            for attempt in range(1 + args.retry_busy):
                result = run_cell_process(args, dtype, ckpt)
                if best is None or result["other_load_cpus"] < best["other_load_cpus"]:
                    best = result
                if best["other_load_cpus"] <= BUSY:
                    break
            best["attempts"] = attempt + 1
            runs[dtype, ckpt].append(best)
    results = [combine(runs[cell]) for cell in cells]

    cuda = args.device == "cuda"
    memory_header = "peak MiB (cuda max allocated, +growth)" if cuda else "peak MiB (RSS growth)"
    print(f"\nmachine: {machine(args)}")
    size = f" of {args.latent_size}x{args.latent_size}" if args.latent_size else ""
    print(f"batch 1, rank {RANK}, AdamW, lora_dtype {args.lora_dtype}, {LATENTS} latents{size}, grad "
          f"accumulation 1; median of {args.steps} steps after {args.warmup} warm-up, "
          f"median of {args.forwards} forwards (half before, half after training); medians "
          f"over {args.repeat} runs per cell; total {time.perf_counter() - started:.0f} s\n")
    print(f"| model | params | dtype | checkpointing | step ms (median) | forward ms | "
          f"fwd+LoRA ms | step/forward | step FLOPs/forward FLOPs | sampler fwd ms | "
          f"step/sampler fwd | {memory_header} | expected MiB (saved + adapter state) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["memory"]
        memory = (f"{m['peak_mib']:.0f} (+{m['growth_mib']:.0f})" if cuda
                  else f"{m['peak_mib']:.0f}")
        e = r.get("expected_mib") or {}
        expected = (f"{e['saved_mib'] + e['adapter_state_mib']:.0f} ({e['saved_mib']:.0f} + "
                    f"{e['adapter_state_mib']:.1f})" if e else "")
        flops = f"{r['flops']['ratio']:.2f}" if r.get("flops") else ""
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['checkpointing']} "
              f"| {r['step_ms']:.1f} | {r['forward_ms']:.1f} | {r['lora_forward_ms']:.1f} "
              f"| {r['ratio']:.2f} | {flops} | {r['sampler_forward_ms']:.1f} | {r['sampler_ratio']:.2f} "
              f"| {memory} | {expected} |")
    loads = [r["other_load_cpus"] for r in results]
    if loads:
        print(f"\nother processes' CPU load during the cells (most in any run): "
              f"{', '.join(f'{v:.2f}' for v in loads)} CPUs"
              + ("  <-- the machine was busy: timings are inflated" if max(loads) > BUSY else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(args), args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
