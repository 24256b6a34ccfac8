#!/usr/bin/env python3
"""Before / after table of two `bench/compile_sm90.py --json` runs (same Triton), for some kernels.

    python bench/compare_sm90.py BEFORE.json AFTER.json [--kernels norms_dots,rank_one_accumulate,...]

One row per case label of the AFTER run's default and opt-in classes (edge shapes left out): registers,
spill bytes, shared memory, the MMA instruction (shape.type; "none": FMA), global access widths in bytes
per thread (cp.async / ld / st; 4 or less is scalar), programs launched (the grid of the case's
specialisation; compile_sm90 records the first case's), programs resident per SM
(`compile_sm90.blocks_per_sm`) and the waves on 132 SMs = programs / (132 × per SM). An autotuned case
("… [tile …]", one row per config) is set against the BEFORE row of the same label without the suffix
(the former fixed config). Compiled only: nothing here ran on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math

SMS = 132


def _rows(run: dict, kernels: list[str]) -> dict[str, dict]:
    out = {}
    for r in run["results"]:
        if r["kernel"].split(".")[0] in kernels and r["class"] != "edge" and r["ok"]:
            out.setdefault(r["cases"][0], r)  # first case: its grid is the one recorded
    return out


def _widths(r: dict) -> str:
    g = r.get("gmem")
    return " ".join(f"{k}:{'/'.join(map(str, g[k])) or '-'}" for k in ("cp.async", "ld", "st")) if g else "?"


def _cells(r: dict | None) -> list[str]:
    if r is None:
        return ["-"] * 7
    programs = math.prod(r["grid"])
    per_sm = r.get("blocks_per_sm")
    waves = f"{programs / (SMS * per_sm):.2f}" if per_sm else "?"
    return [str(r["regs"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["smem"]), r["mma_detail"] or r["mma"],
            _widths(r),
            f"{programs} ({'×'.join(map(str, r['grid']))})", f"{per_sm} / {waves}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--kernels", default="norms_dots,score,rank_one_accumulate,grouped_lora")
    a = ap.parse_args()
    runs = [json.load(open(p)) for p in (a.before, a.after)]
    kernels = a.kernels.split(",")
    before, after = (_rows(r, kernels) for r in runs)
    head = ["regs", "spill B", "smem B", "MMA", "access widths B", "programs (grid)", "per SM / waves"]
    print(f"Triton {runs[1]['triton']} ({runs[1]['ptxas']})\n")
    print("| kernel | case | class | " + " | ".join(f"before {h}" for h in head) + " | "
          + " | ".join(f"after {h}" for h in head) + " |")
    print("|" + "---|" * (3 + 2 * len(head)))
    for case, r in after.items():
        print(f"| `{r['kernel'].split('.')[-1]}` | {case} | {r['class']} | "
              + " | ".join(_cells(before.get(case, before.get(case.split(" [tile ")[0]))) + _cells(r)) + " |")


if __name__ == "__main__":
    main()
