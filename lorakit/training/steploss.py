"""The training loss, kept on the device and read at logging steps only (nanoGPT's rule).

Reading a device tensor on the host (`float(t)`, `int(t)`, `.item()`) waits for every queued kernel: once per
micro-batch it leaves a GPU idle while Python prepares the next batch. Here each step's loss is summed over the
ranks on the device (an asynchronous all-reduce), and the first step whose loss is not finite is tracked on the
device too, so that the loop reads one number when it logs, evaluates or saves a checkpoint, and a non-finite loss
is still caught before any checkpoint holds it, naming the step where it first appeared.
"""

from __future__ import annotations

import torch

from .distributed import World


class LossTracker:
    """Each step's mean loss per label token (all ranks together), on the device."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        self.last: torch.Tensor = torch.full((), float("nan"), dtype=torch.float64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        """The first step (1-based) whose loss was NaN or infinite; 0 while there is none."""
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        """That step's loss."""

    def add(self, step: int, loss_sum: torch.Tensor, n_labels: int) -> None:
        """Record step `step` (1-based): this rank's summed loss and the label tokens of the step on all ranks."""
        total = loss_sum.detach().to(torch.float64).clone()
        if self.world.distributed:
            import torch.distributed as dist

            dist.all_reduce(total)  # on the device: no host synchronisation
        self.last = total / max(n_labels, 1)
        bad = (self.first_bad == 0) & ~torch.isfinite(self.last)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(bad, self.last, self.bad_value)

    def read(self) -> tuple[float, int, float]:
        """(the last step's loss, the first step with a non-finite loss or 0, that loss): one host-device
        synchronisation."""
        values = torch.stack([self.last, self.first_bad.to(torch.float64), self.bad_value]).tolist()
        return values[0], int(values[1]), values[2]
