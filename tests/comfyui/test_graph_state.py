"""One MODEL shared by a whole graph, queued again and again: seeded random sequences of
trainings, samplers, core LoRA loaders, Apply LoRA, continuations, core model clones and
loads of LoRA'd clones with autograd on, over the same input MODEL (what ComfyUI's cache
hands every node that reads it).

After every operation each training has succeeded and the input MODEL still gives
bit-identical outputs to its first run."""

import importlib
import random

import pytest
import torch

from test_train_node import FAMILIES, family_case, model_output, run_train

SEQUENCES = 30  # per family


@pytest.fixture
def loras_dir(comfy, tmp_path):
    """A fresh first loras folder, so existing_lora and LoraLoaderModelOnly list our files."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)] + list(saved[0]), saved[1])
    folder_paths.filename_list_cache.pop("loras", None)
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


def core(name, *args):
    """Run core node ``name`` as ComfyUI's executor does: under inference mode."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    with torch.inference_mode():
        if hasattr(cls, "FUNCTION"):
            return getattr(cls(), cls.FUNCTION)(*args)
        return cls.execute(*args).result


def sample(model, positive, shape):
    """Two KSampler steps from a fixed seed (what a preview sampler does with the model)."""
    latent = {"samples": torch.zeros((1,) + tuple(shape[1:]))}
    [out] = core("KSampler", model, 7, 2, 2.0, "euler", "normal", positive, positive, latent, 1.0)
    assert torch.isfinite(out["samples"]).all()


class Graph:
    """The state a sequence builds: the shared MODEL and what earlier nodes produced."""

    def __init__(self, family, pack, pack_nodes, loras_dir, rng):
        self.family = family
        self.train_node = pack_nodes["LoRALab_TrainLoRA"]
        self.apply_node = pack_nodes["LoRALab_ApplyLoRA"]
        with torch.inference_mode():  # as UNETLoader and the checkpoint loaders run
            self.model, self.latents, self.positive, self.probe = family_case(family)
        self.latents, self.positive = self.latents.clone(), [
            [c.clone(), {k: v.clone() for k, v in extra.items()}] for c, extra in self.positive]
        self.probe = self.probe.clone()
        self.reference = model_output(self.model, self.probe, self.positive)
        self.shape = FAMILIES[family][2]
        self.algorithms = list(importlib.import_module(pack.__name__ + ".lora").ADAPTERS)
        self.rng = rng
        self.loras_dir = loras_dir
        self.trained = []  # (model_with_lora, lora) of each training
        self.files = []  # LoRA files in the loras folder
        self.derived = []  # core clones of the input MODEL
        self.log = []
        self.last_loaded = None  # (clone, loaded under inference mode) of the last operation

    def check(self):
        """The input MODEL's output, then the clone the last operation loaded is loaded again
        as it was, so the next operation meets the state this one left."""
        import comfy.model_management

        out = model_output(self.model, self.probe, self.positive)
        assert torch.equal(out, self.reference), (
            f"the input MODEL changed after {self.log}: max diff "
            f"{(out - self.reference).abs().max().item()}")
        if self.last_loaded is not None:
            clone, inference = self.last_loaded
            with torch.inference_mode(inference):
                comfy.model_management.load_models_gpu([clone])

    def sample(self, model):
        sample(model, self.positive, self.shape)
        self.last_loaded = (model, True)

    # -- operations ---------------------------------------------------------------------------
    def train(self, existing="[None]", on=None):
        r = self.rng
        options = dict(
            training_dtype=r.choice(["bf16", "fp32"]), lora_dtype=r.choice(["bf16", "fp32"]),
            algorithm=r.choice(self.algorithms), gradient_checkpointing=r.random() < 0.5,
            batch_size=r.randint(1, 3), steps=2, existing_lora=existing)
        target = on if on is not None else self.model
        self.log.append(("train", "derived" if on is not None else "input", options))
        trained, lora, loss, _ = run_train(
            self.train_node, target, self.latents, self.positive, **options)
        self.last_loaded = None  # a training unloads its clone
        assert len(loss["loss"]) == 2 and all(map(torch.isfinite, map(torch.tensor, loss["loss"])))
        self.trained.append((trained, lora))
        import comfy.utils

        name = f"run_{len(self.files)}.safetensors"
        comfy.utils.save_torch_file(lora, str(self.loras_dir / name))
        import folder_paths

        folder_paths.filename_list_cache.pop("loras", None)
        self.files.append(name)

    def step(self):
        r = self.rng
        choices = ["train", "derive"]
        if self.trained:
            choices += ["sample_trained", "apply_lora", "load_for_training"]
        if self.files:
            choices += ["core_loader", "continue"]
        if self.derived:
            choices += ["sample_derived", "train_derived"]
        op = r.choice(choices)
        if op == "train":
            self.train()
        elif op == "continue":
            self.train(existing=r.choice(self.files))
        elif op == "train_derived":
            self.train(on=r.choice(self.derived))
        elif op == "sample_trained":
            self.log.append((op,))
            self.sample(r.choice(self.trained)[0])
        elif op == "load_for_training":
            # a node that loads a LoRA'd clone with autograd on, as core's trainer does: its
            # patched weights are normal tensors, the backups it restores are inference ones
            self.log.append((op,))
            import comfy.model_management

            clone = r.choice(self.trained)[0]
            with torch.inference_mode(False):
                comfy.model_management.load_models_gpu([clone])
            self.last_loaded = (clone, False)
        elif op == "apply_lora":
            strength = r.choice([1.0, 0.5, -1.0])
            self.log.append((op, strength))
            with torch.inference_mode():
                [applied] = self.apply_node.execute(
                    self.model, r.choice(self.trained)[1], strength).result
            self.sample(applied)
        elif op == "core_loader":
            name = r.choice(self.files)
            self.log.append((op, name))
            [loaded] = core("LoraLoaderModelOnly", self.model, name, r.choice([1.0, 0.7]))
            self.sample(loaded)
        elif op == "sample_derived":
            self.log.append((op,))
            self.sample(r.choice(self.derived))
        elif op == "derive":
            kind = r.choice(["sampling", "dtype"])
            if kind == "dtype":
                dtype = r.choice(["fp32", "bf16", "fp16"])
                [clone] = core("ModelComputeDtype", self.model, dtype)
            elif self.family == "sd3":
                dtype = r.choice([1.0, 3.0])
                [clone] = core("ModelSamplingSD3", self.model, dtype)
            else:
                dtype = r.choice(["eps", "v_prediction"])
                [clone] = core("ModelSamplingDiscrete", self.model, dtype, False)
            self.log.append((op, kind, dtype))
            self.derived.append(clone)
            self.sample(clone)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sequence", range(SEQUENCES))
def test_shared_model_survives_any_graph(family, sequence, pack, pack_nodes, loras_dir):
    rng = random.Random(f"{family}-{sequence}")
    graph = Graph(family, pack, pack_nodes, loras_dir, rng)
    for _ in range(rng.randint(5, 8)):
        graph.step()
        graph.check()
