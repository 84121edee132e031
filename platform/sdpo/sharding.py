"""Sharded training (FSDP2): parameters, gradients and optimiser state split across the workers. Torch only.

With DDP every worker holds the whole model, its gradients and AdamW's two moments: ~16 bytes a
parameter in fp32, so a 7B model needs ~112 GB per worker before activations. `training.parallelism:
fsdp` shards all of it over the W workers (~16/W bytes a parameter) with PyTorch's `fully_shard`: each
decoder layer is its own unit (gathered just before its forward and backward, freed after), the root
holds the embeddings and head. Gradients are reduce-scattered, averaged over the workers as DDP's
all-reduce averages them, so the step's rescale and clipping (training.py, worker.py) are unchanged.

With bf16 the gathered parameters are bf16 and gradients are reduced in fp32 (`MixedPrecisionPolicy`);
the sharded master weights and optimiser state stay fp32. In fp32 the numerics are DDP's up to float
summation order (tests/test_sharding.py, tests/test_pipeline.py).

A stage's model is saved whole, as a Hugging Face model: `full_state_dict` gathers the weights to rank 0
(a collective: every rank calls it). Mid-stage checkpoints of a sharded run stay sharded:
`save_sharded` has every rank write its own shard of the weights and of AdamW's state with
torch.distributed.checkpoint (DCP), so no rank ever holds the whole training state (a 7B model's is
~112 GB); rank 0 adds the index (`.metadata`). A resumed run loads the stage's initial weights, shards
them, and `load_sharded` reads each rank's share back — from any number of ranks: DCP re-shards on load.
`full_optimizer_state` / `load_optimizer_state` move a whole optimiser state (gathered to every rank's
share), for unsharded runs and tests.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names transformers marks as not to be split across devices: the decoder layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} does not name its decoder layers (_no_split_modules), so fsdp cannot "
            f"shard it layer by layer; use training.parallelism: ddp"
        )
    return names


def shard_model(model: torch.nn.Module, device: torch.device, world: int, *, bf16: bool) -> torch.nn.Module:
    """Shard `model` in place over the `world` ranks of the default process group; returns it (now an
    FSDPModule, still the same transformers class)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no module of {sorted(names)} in {type(model).__name__}: cannot shard it layer by layer")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """The whole model's weights on CPU at rank 0 ({} elsewhere); None for an unsharded model (save it as
    it is). A collective when sharded: every rank must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state, whole, keyed by parameter name when sharded (a collective), else as is."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore `full_optimizer_state`'s output: every rank passes the whole state and keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Write this rank's shard of the weights and the optimiser state to `directory` (DCP). A collective:
    every rank calls it, each with a directory of its own if it likes — the files have rank-unique names
    (`__<rank>_0.distcp`) and rank 0 writes the `.metadata` that indexes them all, so the ranks' folders
    merged are one checkpoint (what Ray Train does with every rank's reported checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, storage_writer=dcp.FileSystemWriter(directory))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load `save_sharded`'s checkpoint into `model` and `optimizer`, each rank reading its own share
    (sharded or not, on as many ranks as it likes: DCP re-shards on load). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer)  # the layout to fill (AdamW's state initialised)
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, storage_reader=dcp.FileSystemReader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def as_float(value: Tensor) -> float:
    """A norm or loss as a float, whether a plain tensor or a replicated DTensor (FSDP's clip_grad_norm_)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
