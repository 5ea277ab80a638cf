"""Run by tests/test_fsdp.py under torchrun: build the model of a `lorakit train` run as each rank does (with or
without --fsdp) and print, from rank 0, each rank's parameter bytes (local shards) and peak resident memory."""

import json
import os
import resource
import sys

import torch

from lorakit.training.config import build_config
from lorakit.training.distributed import all_sum, gather_objects, init_world, shutdown
from lorakit.training.fsdp import local_base_bytes
from lorakit.training.loop import build_model, read_data


def main(model: str, data: str, fsdp: bool) -> None:
    world = init_world()
    cfg = build_config({"model": model, "data": data, "fsdp": fsdp}, source="test")
    rows, _ = read_data(cfg)
    net = build_model(cfg, rows, 0, torch.device("cpu"), None, world)
    local, whole = local_base_bytes(net)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found = gather_objects(world, {"local_bytes": local, "whole_bytes": whole, "peak_rss_mib": rss_mib})
    all_sum(world, 0.0)
    if world.main:
        print("RESULT " + json.dumps(found), flush=True)
    shutdown(world)
    # Once, on a heavily loaded machine, rank 0 aborted after this point, in interpreter teardown ("terminate called
    # without an active exception"): the measurement is complete here, so leave without running C++ destructors.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp")
