"""Optimizers by the name the node shows; each is built by ``make_optimizer``.

Every optimizer runs with its own default hyperparameters (Prodigy: two settings its package
recommends, below), except the learning rate (the node's ``learning_rate``, the same number
for every optimizer) and, when one is given, the weight decay. ``params`` may be parameters
or torch param groups (``{"params": [...], "lr": ...}``), e.g. LoRA+ giving the up (B)
matrices their own learning rate.

AdamW
    ``torch.optim.AdamW``: betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.01.
Adam
    ``torch.optim.Adam``: betas (0.9, 0.999), eps 1e-8, weight decay 0 (an L2 term when set).
SGD
    ``torch.optim.SGD``: no momentum, weight decay 0.
RMSprop
    ``torch.optim.RMSprop``: alpha 0.99, eps 1e-8, no momentum, weight decay 0.
Prodigy
    ``prodigyopt.Prodigy`` (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner", ICML 2024, arXiv:2306.06101; package ``prodigyopt``). Adam that
    estimates its own step size d (starting from d0 1e-6): betas (0.9, 0.999), beta3
    sqrt(0.999), eps 1e-8, decoupled weight decay 0, d_coef 1.0, and, as the package
    recommends for diffusion models, ``safeguard_warmup=True`` and
    ``use_bias_correction=True``. (Without them, d overshot within 40 steps on the tests'
    tiny networks and the LoRA diverged; with them d grows over the first hundred or so
    steps and then holds, so very short runs barely move.)
    The learning rate multiplies the estimated step, so the usual value is **1.0** (0.5 or
    2.0 to push the estimate down or up); a typical AdamW rate such as 5e-4 makes it learn
    thousands of times slower. One step size for all parameters: param groups with different
    learning rates (LoRA+) are refused, as prodigyopt refuses them (konstmish/prodigy#34,
    kohya-ss/sd-scripts#1929).
AdamWScheduleFree
    ``schedulefree.AdamWScheduleFree`` (Defazio et al., "The Road Less Scheduled",
    NeurIPS 2024, arXiv:2405.15682; package ``schedulefree``). AdamW without a learning-rate
    schedule: betas (0.9, 0.999), eps 1e-8, weight decay 0, no warmup, r 0, weight_lr_power 2.
    The package suggests a learning rate 1-10x that of scheduled AdamW (its default 2.5e-3).
    It keeps two points: gradients are taken at y (train mode), and the averaged weights x
    (eval mode) are the result. It must be in train mode while stepping and in eval mode when
    the weights are read, so the loop calls ``set_training(optimizer, True)`` before the
    first step and ``set_training(optimizer, False)`` after the last one, before it saves
    the adapters. ``make_optimizer`` already returns it in train mode.
Adafactor
    ``torch.optim.Adafactor`` (torch >= 2.5; Shazeer & Stern, "Adafactor: Adaptive Learning
    Rates with Sublinear Memory Cost", ICML 2018, arXiv:1804.04235). Factored second moment
    for matrices, no momentum: beta2_decay -0.8, eps (None, 1e-3), update clipping d 1.0,
    weight decay 0 (decoupled, scaled by lr). The learning rate caps the relative step size
    rho_t = min(lr, 1/sqrt(t)), and each step is scaled by max(1e-3, RMS(parameter)); torch's
    default lr is 1e-2. Adapter factors that start at zero (LoRA's up) therefore move by
    about 1e-3 * rho_t per element and step at first, so adapters need a larger lr than 1e-2
    (0.1-1.0; at 1.0, rho_t is the paper's 1/sqrt(t)); the node's default 5e-4 barely moves.
Lion
    ``lion_pytorch.Lion`` (Chen et al., "Symbolic Discovery of Optimization Algorithms",
    NeurIPS 2023, arXiv:2302.06675; package ``lion-pytorch``). Sign-of-momentum update, so
    every element moves by exactly lr per step: betas (0.9, 0.99), weight decay 0 (decoupled,
    scaled by lr). The authors use a learning rate 3-10x smaller than AdamW's (the package's default
    1e-4), and a weight decay 3-10x larger.

Adam and AdamW use torch's fused kernel where this torch offers it for the parameters'
device (one kernel for all adapter tensors instead of a loop over them); otherwise the
default implementation. The third-party packages are imported only when their optimizer is
built, so the pack imports without them; building one that is missing is a ``ValueError``
that says what to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

import torch

Params = Union[Iterable[torch.nn.Parameter], Iterable[Mapping[str, Any]]]


@dataclass(frozen=True)
class OptimizerFactory:
    """Builds one optimizer: ``factory(params, lr=..., **hyperparameters)``.

    ``module``/``attr`` name the class; it is imported on first use, never at pack import.
    """

    name: str
    module: str
    attr: str
    package: str | None = None  # the pip name, for optimizers outside torch
    min_torch: str | None = None  # for torch optimizers newer than the pack's oldest torch
    fused: bool = False  # try torch's fused kernel first
    train_mode: bool = False  # schedule-free: has train()/eval() and must step in train mode
    defaults: tuple[tuple[str, Any], ...] = ()  # the pack's own hyperparameters (overridable)
    one_lr: bool = False  # refuses param groups whose learning rates differ (except 0)

    def load(self) -> type[torch.optim.Optimizer]:
        """The optimizer class, or a ValueError that says how to get it."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            if self.package is None:
                raise
            raise ValueError(
                f"optimizer {self.name!r} needs the package {self.package}; install it with "
                f"`pip install {self.package}` (ComfyUI-Manager installs the pack's "
                f"requirements.txt).") from error
        cls = getattr(module, self.attr, None)
        if cls is None:
            if self.min_torch is not None:
                raise ValueError(
                    f"optimizer {self.name!r} needs torch >= {self.min_torch} "
                    f"({self.module}.{self.attr}); this is torch {torch.__version__}. Update "
                    f"the torch that ComfyUI runs on, or choose another optimizer.")
            raise ValueError(
                f"optimizer {self.name!r}: {self.module} has no {self.attr}; install a newer "
                f"{self.package or self.module}.")
        return cls

    def __call__(self, params: Params, **options: Any) -> torch.optim.Optimizer:
        cls = self.load()
        params = list(params)
        options = {**dict(self.defaults), **options}
        if self.one_lr:
            rates = {p.get("lr", options.get("lr")) for p in params if isinstance(p, Mapping)}
            if len(rates - {0, 0.0}) > 1:
                raise ValueError(
                    f"optimizer {self.name!r} takes one learning rate for all parameters (it "
                    f"estimates a single step size; {self.package} refuses param groups whose "
                    f"learning rates differ, except 0), but the groups ask for "
                    f"{', '.join(f'{r:g}' for r in sorted(rates))}. With LoRA+, set "
                    f"lora_plus_ratio to 1 or choose another optimizer.")

        def fresh():  # torch fills group dicts in place, so each attempt gets its own copies
            return [dict(p) if isinstance(p, Mapping) else p for p in params]

        optimizer = None
        if self.fused:
            try:
                optimizer = cls(fresh(), fused=True, **options)
            except (RuntimeError, TypeError, ValueError):
                pass  # this torch has no fused kernel for these parameters
        if optimizer is None:
            optimizer = cls(fresh(), **options)
        if self.train_mode:
            optimizer.train()  # ready to step; set_training(optimizer, False) reads x
        return optimizer


OPTIMIZERS: dict[str, OptimizerFactory] = {
    factory.name: factory
    for factory in (
        OptimizerFactory("AdamW", "torch.optim", "AdamW", fused=True),
        OptimizerFactory("Adam", "torch.optim", "Adam", fused=True),
        OptimizerFactory("SGD", "torch.optim", "SGD"),
        OptimizerFactory("RMSprop", "torch.optim", "RMSprop"),
        OptimizerFactory(
            "Prodigy", "prodigyopt", "Prodigy", package="prodigyopt",
            defaults=(("safeguard_warmup", True), ("use_bias_correction", True)), one_lr=True),
        OptimizerFactory(
            "AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", package="schedulefree",
            train_mode=True),
        OptimizerFactory("Adafactor", "torch.optim", "Adafactor", min_torch="2.5"),
        OptimizerFactory("Lion", "lion_pytorch", "Lion", package="lion-pytorch"),
    )
}


def _param_groups(params: Params) -> list:
    """``params`` as a list: of parameters, or of param-group dicts (each copied, its
    ``params`` made a list) when groups are given."""
    items = list(params)
    groups = [isinstance(item, Mapping) for item in items]
    if not any(groups):
        return items
    if not all(groups):
        raise ValueError("params must be all parameters or all param-group dicts, not a mix.")
    out = []
    for group in items:
        if "params" not in group:
            raise ValueError(f"a param group has no 'params' entry (keys: {', '.join(group)}).")
        group = dict(group)
        group["params"] = (
            [group["params"]] if isinstance(group["params"], torch.Tensor)
            else list(group["params"]))
        out.append(group)
    return out


def make_optimizer(
    name: str, params: Params, lr: float, weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` over ``params`` (parameters or param-group dicts).

    ``lr`` is the learning rate of groups that do not set their own. ``weight_decay=None``
    keeps the optimizer's own default; a number is passed on (groups may set their own).
    """
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={name!r} is not available; choose one of {', '.join(OPTIMIZERS)}.")
    options: dict[str, Any] = {"lr": lr}
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    return OPTIMIZERS[name](_param_groups(params), **options)


def set_training(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Put a schedule-free optimizer in train mode (before stepping) or eval mode (before the
    weights are read or saved); a no-op for optimizers without these modes.

    Schedule-free optimizers step at the point y and keep the weights to use, x, apart; eval
    mode writes x into the parameters and train mode brings y back.
    """
    switch = getattr(optimizer, "train" if training else "eval", None)
    if callable(switch):
        switch()


__all__ = ["OPTIMIZERS", "OptimizerFactory", "make_optimizer", "set_training"]
