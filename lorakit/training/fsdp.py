"""`--fsdp`: the frozen base sharded over the processes of a torchrun run with FSDP2 (`fully_shard`), per
transformer block, so that each process holds about 1/N of it (plus the block being computed, gathered).

- Loading: rank 0 reads the weights (`load_base`); the other ranks build the same model on the meta device from
  its config (`meta_base`), so the machine never holds N copies. Every rank adds the same LoRA layers, then
  `fully_shard` shards each block and the rest (embeddings, head); the meta ranks allocate their shards and rank 0
  scatters every parameter's shards to them, one parameter at a time.
- What trains (LoRA's A and B, a new head) is kept out of the sharding (`ignored_params`): every rank holds the
  whole of it, as with DDP, and its gradients are averaged over the ranks at the end of each backward that syncs
  (`ShardedStep`; `no_sync` skips it for the micro-batches before the last), as DDP does. LoRA tensors are small
  next to the base, and so adapters, checkpoints, `--resume` and the optimizer work as in any run: rank 0 writes
  the whole tensors.
- The base fingerprints that adapters record are computed by rank 0 on the whole weights before sharding and sent
  to the other ranks.
- Every rank must run every forward (each gathers its blocks from all): evaluation runs all evaluation rows on
  every rank (the token-weighted mean is unchanged), and generation during training (`--eval-generate`) is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..lora.fingerprint import remember
from ..lora.layer import LoRALayer
from ..lora.wrap import lora_layers
from .distributed import World


def check_fsdp(cfg: Any, world: World) -> None:
    """What --fsdp needs, checked before anything loads."""
    if not world.distributed and not cfg.resume:  # (a resume on another process count is refused by name later)
        raise LorakitError("--fsdp shards the base over several processes: run it with --nproc N (N >= 2) or torchrun")


def load_model(world: World, load: Callable[[], nn.Module], build_meta: Callable[[], nn.Module]) -> nn.Module:
    """Rank 0: the loaded base; other ranks: the same model on the meta device (`shard_model` fills them in)."""
    import torch.distributed as dist

    model = load() if world.main else build_meta()
    new = [getattr(model, "lorakit_new_params", [])]
    dist.broadcast_object_list(new, src=0)  # parameters missing from the checkpoint, as rank 0 loaded it
    model.lorakit_new_params = new[0]
    return model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: its largest nn.ModuleList by parameter count."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise LorakitError(f"--fsdp: no list of transformer blocks found in {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_model(model: nn.Module, world: World, device: torch.device) -> None:
    """Shard the frozen base of a wrapped model in place (see the module docstring); the trained parameters stay
    whole on every rank."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    share_fingerprints(model, world)
    trained = {p for p in model.parameters() if p.requires_grad}
    whole = {name: p.detach() for name, p in model.named_parameters()} if world.main else {}
    mesh = _mesh(world, device)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=trained & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=trained)
    if not world.main:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                if world.main:
                    full = whole.pop(name).to(device)
                else:  # filled by the scatter from rank 0 (its own part only); one parameter at a time
                    full = torch.empty(param.shape, dtype=param.dtype, device=device)
                piece = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
                param.to_local().copy_(piece.to_local())
                del full, piece
            else:  # kept whole (what trains): sent to every rank
                param.data = param.data.to(device)
                dist.broadcast(param.data, src=0)
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
                    _broadcast(module._buffers[key])
    whole.clear()
    model.lorakit_sharded = True  # (its forward runs whole: loss.py does not call its backbone and head apart)


def _mesh(world: World, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def _broadcast(tensor: torch.Tensor) -> None:
    """Broadcast from rank 0 in place (gloo has no bool: sent as bytes)."""
    import torch.distributed as dist

    dist.broadcast(tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor, src=0)


def share_fingerprints(model: nn.Module, world: World) -> None:
    """Rank 0 fingerprints every adapted base weight while it is whole; the other ranks take its values."""
    import torch.distributed as dist

    layers = list(lora_layers(model))
    if world.main:
        LoRALayer.fingerprint_all(layer for _, layer in layers)
    found = [[layer.base_fingerprint() for _, layer in layers] if world.main else None]
    dist.broadcast_object_list(found, src=0)
    if not world.main:
        for (_, layer), fingerprint in zip(layers, found[0]):
            remember(layer.base, fingerprint)


class ShardedStep(nn.Module):
    """The loss step of a sharded model: the trained parameters' gradients are averaged over the ranks at the end
    of each backward outside `no_sync` (FSDP has nothing to reduce: all it shards is frozen)."""

    def __init__(self, step: nn.Module, params: list[nn.Parameter], world: World) -> None:
        super().__init__()
        self.step = step
        self.params = params
        self.world = world
        self.sync = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate this micro-batch's gradients locally (as DDP.no_sync)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.step(batch)
        if self.sync and loss.requires_grad:
            loss.register_hook(self._at_backward)
        return loss

    def _at_backward(self, grad: torch.Tensor) -> torch.Tensor:
        torch.autograd.Variable._execution_engine.queue_callback(self.average_gradients)  # after the whole backward
        return grad

    def average_gradients(self) -> None:
        """Every trained parameter's gradient, averaged over the ranks (one all-reduce of all of them)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world.size
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def local_base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the frozen base's parameters this rank holds, bytes of the whole frozen base): a sharded
    parameter counts its local shard."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        size = p.element_size()
        whole += p.numel() * size
        local += (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) * size
    return local, whole
