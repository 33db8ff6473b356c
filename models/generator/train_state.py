"""Everything a training run needs to continue bit-identically, as flat tensors plus a JSON-able dict.

The state is: the step, the network, every optimiser and its LR schedule, the EMA copies, the run's
own torch.Generators (batch sampler, objective noise), and the process-global RNGs (torch CPU,
CUDA when present, NumPy, Python) in case anything draws from them (other threads share Python's:
a Prefect server's threads draw from it, so only its state at the restore is the run's own; the
loop itself draws from its generators). `export_state` turns it into
({name: tensor}, meta) for a safetensors file and a JSON sidecar; `import_state` puts it back.
No I/O here: storage/checkpoints.py writes and reads the two halves.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn


# The reference's EDM EMA counts 1024 images a step whatever the batch (utils/ema_util.py): its batch.
# Kept as the count here, so a half-life in kimg means the same number of steps as there.
IMAGES_PER_STEP = 1024


class EMA:
    """An exponential moving average of a model's parameters: a constant `decay` per step, or EDM's
    (Karras et al. 2024, the reference's utils/ema_util.py) half-life in thousands of images,
    `halflife_kimg`, ramped up to `rampup` times the images seen so far, so a short run samples its
    recent weights and not its random init: after update k (1-based, the new step as the reference
    passes it), decay = 0.5 ** (1024 / min(halflife, rampup * 1024 k)), counting IMAGES_PER_STEP."""

    def __init__(self, model: nn.Module, decay: float | None = None, halflife_kimg: float | None = None,
                 rampup: float = 0.05):
        if (decay is None) == (halflife_kimg is None):
            raise ValueError("an EMA takes either a constant decay or an EDM half-life in kimg")
        self.decay, self.halflife_kimg, self.rampup = decay, halflife_kimg, rampup
        self.name = ema_name(decay, halflife_kimg)
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, step: int) -> float:
        """The decay applied by the `step`-th update (1-based: the step count after it)."""
        if self.decay is not None:
            return self.decay
        halflife_images = min(self.halflife_kimg * 1000, step * IMAGES_PER_STEP * self.rampup)
        return 0.5 ** (IMAGES_PER_STEP / max(halflife_images, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        keep = self.beta(step)
        # one multi-tensor launch per group, not one per parameter: a B model's ~400 tensors times 3 EMAs
        # were ~1,200 small kernels a step; same lerp arithmetic per element
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in model.parameters()], 1.0 - keep)


def ema_name(decay: float | None = None, halflife_kimg: float | None = None) -> str:
    """'0.999' for a constant decay, 'edm500kimg' for an EDM half-life of 500 kimg."""
    return repr(float(decay)) if decay is not None else f"edm{float(halflife_kimg):g}kimg"


@dataclass
class TrainState:
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedules: list[torch.optim.lr_scheduler.LRScheduler]
    emas: list[EMA]
    generators: dict[str, torch.Generator]
    step: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)   # per-step stats since step 0

    def ema(self, which: float | str) -> nn.Module:
        """The EMA model with this constant decay (a float) or this name (models.generator.train_state.ema_name)."""
        name = which if isinstance(which, str) else ema_name(which)
        for ema in self.emas:
            if ema.name == name:
                return ema.shadow
        raise KeyError(f"no EMA {name}; tracked: {[e.name for e in self.emas]}")


def _split(tree, prefix: str, tensors: dict[str, Tensor]):
    """Tensors in a nested dict/list go to `tensors` under a path name; the rest stays as JSON."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().clone()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[key, _split(value, f"{prefix}/{key}", tensors)] for key, value in tree.items()]}
    if isinstance(tree, (list, tuple)):
        items = [_split(value, f"{prefix}/{i}", tensors) for i, value in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    return tree


def _join(tree, tensors: dict[str, Tensor]):
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {key: _join(value, tensors) for key, value in tree["__dict__"]}
    if isinstance(tree, dict) and "__tuple__" in tree:
        return tuple(_join(value, tensors) for value in tree["__tuple__"])
    if isinstance(tree, list):
        return [_join(value, tensors) for value in tree]
    return tree


def _global_rng() -> dict:
    np_state = np.random.get_state()
    keys = torch.from_numpy(np_state[1].astype(np.int64))   # uint32 words, stored widened
    state = {"torch": torch.get_rng_state(), "numpy": (np_state[0], keys, *np_state[2:]),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_state(state: TrainState) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {f"model/{k}": v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
    for ema in state.emas:
        tensors.update({f"ema/{ema.name}/{k}": v.detach().cpu().clone()
                        for k, v in ema.shadow.state_dict().items()})
    for name, values in state.history.items():
        tensors[f"history/{name}"] = torch.tensor(values, dtype=torch.float64)
    tree = {
        "optimizers": [o.state_dict() for o in state.optimizers],
        "schedules": [s.state_dict() for s in state.schedules],
        "generators": {name: g.get_state() for name, g in state.generators.items()},
        "global_rng": _global_rng(),
    }
    meta = {"step": state.step, "emas": [e.name for e in state.emas], "history_keys": list(state.history),
            "tree": _split(tree, "state", tensors)}
    return tensors, meta


def import_state(state: TrainState, tensors: dict[str, Tensor], meta: dict) -> TrainState:
    """Load exported tensors + meta into a freshly built TrainState of the same shape (in place)."""
    state.model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    saved = meta["emas"] if "emas" in meta else [ema_name(d) for d in meta["ema_decays"]]   # older snapshots
    if sorted(saved) != sorted(e.name for e in state.emas):
        raise ValueError(f"checkpoint tracks EMAs {saved}, run wants {[e.name for e in state.emas]}")
    for ema in state.emas:
        prefix = f"ema/{ema.name}/"
        ema.shadow.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    tree = _join(meta["tree"], tensors)
    if len(tree["optimizers"]) != len(state.optimizers):
        raise ValueError("checkpoint and run use different optimisers")
    for optimizer, saved in zip(state.optimizers, tree["optimizers"]):
        optimizer.load_state_dict(saved)   # moves state tensors to the parameters' device
    for schedule, saved in zip(state.schedules, tree["schedules"]):
        schedule.load_state_dict(saved)
    for name, generator in state.generators.items():
        generator.set_state(tree["generators"][name].to(torch.uint8))
    _set_global_rng(tree["global_rng"])
    state.history = {name: tensors[f"history/{name}"].tolist() for name in meta["history_keys"]}
    state.step = int(meta["step"])
    return state
