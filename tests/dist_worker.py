"""One rank of test_distributed.py: `python dist_worker.py OUT_DIR` with RANK, WORLD_SIZE, MASTER_ADDR/PORT set."""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_cases import CASES, poisoning, run_case  # noqa: E402
from tiny_models import tiny_llama_lora  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama_lora(seed=0)
    results = {}
    for method, store in CASES:
        results[(method, store)] = run_case(model, method, store, out_dir, None)
    from pyinf import gradients as gradients_mod

    poisoning(gradients_mod, setattr)
    results[("datainf", "skip")] = run_case(model, "datainf", "cpu", out_dir, None, nan_policy="skip")
    results[("exact", "skip-disk")] = run_case(model, "exact", "disk", out_dir + "/skip", None, nan_policy="skip")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
