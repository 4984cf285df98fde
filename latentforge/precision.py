"""Training precision: fp32, bf16 autocast, or `auto`, which takes bf16 only where it trains faster.

What was measured (1 thread, `bench/throughput.py`):
- A 2-core Xeon without AMX (avx512_bf16 only): a bf16 2048^2 matmul runs at half fp32's rate
  (82-96 vs 145-181 GFLOP/s), and bf16 autocast makes every model's training step 1.6-2.8x
  slower.
- A 2-core Xeon with AMX (shared/PITFALLS.md): bf16 matmuls run 5.6x fp32's rate, yet bf16
  autocast made the default (tiny) tokenizer's training 2x *slower*: a tiny model is bound by
  casts and per-op overheads, not by its matmuls.

- A 2-core AMD EPYC (Zen 5, avx512_bf16, no AMX): bf16 matmuls run ~4x fp32's rate, and
  bf16 autocast trained the tiny tokenizer at 0.63x fp32's speed, until attention was kept in
  fp32 (models/layers.py: CPU attention kernels are 4-13x slower in bf16); since then bf16
  trains every model faster there (1.3-2.3x, bench/throughput.py).

So the matmul rate does not predict a training step; it only rules bf16 out where bf16
matmuls are no faster than fp32 ones (a ~0.2 s measurement, once per machine). Elsewhere
`auto` times a few training steps of the stage's own model in both precisions (once per
machine and model) and takes bf16 only when its step is at least `MIN_SPEEDUP` times faster:
bf16 costs accuracy, so a tie goes to fp32.

Both measurements are cached in one JSON file per user (`precision.json` in
$LATENTFORGE_CACHE_DIR, else $XDG_CACHE_HOME/latentforge, else ~/.cache/latentforge), keyed
by the machine (CPU model and instruction set, or GPU name; torch version; threads; where fp32
Linear layers run, models/layers.py) and, for
the steps, by the model (class, parameter count, batch shapes). Delete the file to measure
again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentforge.models.layers import fp32_linear_backend
from latentforge.storage import read_json_dict

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CACHE_FILE = "precision.json"
# bf16 must beat fp32 by this factor: a bf16 step within noise of fp32's is not worth its
# rounding.
MIN_SPEEDUP = 1.1
# Below this bf16/fp32 matmul rate ratio no step is timed: bf16 cannot win where its matmuls
# are not faster (every model measured trained slower in bf16 than its matmuls alone predict).
MIN_MATMUL_SPEEDUP = 1.2
# The cache's key for step timings; a new key when the models' bf16 path changes makes every
# machine time its steps again (v2: attention kept in fp32 on CPU).
STEPS_KEY = "steps_v2"


def cache_path() -> Path:
    """The JSON file that holds the measurements of every machine this user ran on."""
    root = os.environ.get("LATENTFORGE_CACHE_DIR")
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "latentforge" / CACHE_FILE


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> str:
    """What the speed of a bf16 vs fp32 step depends on, besides the model."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {name} sm{major}{minor} | torch {torch.__version__}"
    isa = torch.backends.cpu.get_cpu_capability()
    # where fp32 Linear layers run (models/layers.py) sets the fp32 side of the comparison
    return (f"cpu {_cpu_model()} {isa} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | fp32 linear {fp32_linear_backend()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_speedup(device: torch.device, n: int = 1024, reps: int = 3) -> float:
    """bf16 over fp32 matmul rate (n x n), interleaved; > 1 where bf16 matmuls are faster."""
    seconds: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    pairs = {dtype: (torch.randn(n, n, device=device, dtype=dtype),
                     torch.randn(n, n, device=device, dtype=dtype)) for dtype in seconds}
    for a, b in pairs.values():  # warm-up: kernel selection, lazy initialisation
        a @ b
    _sync(device)
    for _ in range(reps):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            _sync(device)
            seconds[dtype].append(time.perf_counter() - start)
    return min(seconds[torch.float32]) / min(seconds[torch.bfloat16])


def time_steps(step: Callable[[bool], object], device: torch.device, rounds: int = 3,
               per_round: int = 2) -> dict[str, float]:
    """Median seconds of `step(bf16)` in each precision, interleaved after one warm-up each."""
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for precision in PRECISIONS:
        step(precision == "bf16")
    for _ in range(rounds):
        for precision in PRECISIONS:
            _sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                step(precision == "bf16")
            _sync(device)
            seconds[precision].append((time.perf_counter() - start) / per_round)
    return {p: statistics.median(v) for p, v in seconds.items()}


def _write_cache(path: Path, machine: str, entry: dict[str, Any]) -> None:
    """Merge `entry` into the machine's record; a cache that cannot be written is only logged."""
    from latentforge.storage import write_bytes_atomic

    data = read_json_dict(path)  # reread: another process may have added its own machine or model
    record = data.setdefault(machine, {})
    for key, value in entry.items():
        if isinstance(value, dict):
            record.setdefault(key, {}).update(value)
        else:
            record[key] = value
    try:
        write_bytes_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())
    except OSError as exc:
        log.warning("precision: could not write the cache %s (%s); auto measures again next "
                    "time", path, exc)


def choose_precision(device: torch.device, workload: str,
                     step: Callable[[], Callable[[bool], object]]) -> str:
    """'bf16' or 'fp32' for `workload` (a model and batch signature) on this machine's `device`.

    `step()` builds the model once and returns `step(bf16)`, one training update; it is called
    only when bf16 matmuls are faster here and this workload was not measured before.
    """
    path, machine = cache_path(), machine_key(device)
    record = read_json_dict(path).get(machine, {})
    speedup = record.get("matmul_bf16_speedup")
    if not isinstance(speedup, float):
        speedup = matmul_speedup(device)
        _write_cache(path, machine, {"matmul_bf16_speedup": speedup})
    if speedup < MIN_MATMUL_SPEEDUP:
        log.info("precision auto: fp32 (bf16 matmuls run at %.2fx fp32's rate on %s)", speedup,
                 machine)
        return "fp32"
    steps = record.get(STEPS_KEY, {}).get(workload)
    if not (isinstance(steps, dict) and set(PRECISIONS) <= steps.keys()):
        steps = time_steps(step(), device)
        _write_cache(path, machine, {STEPS_KEY: {workload: steps}})
    choice = "bf16" if steps["fp32"] >= MIN_SPEEDUP * steps["bf16"] else "fp32"
    log.info("precision auto: %s (training step %.1f ms fp32, %.1f ms bf16 on %s; bf16 "
             "matmuls %.2fx fp32)", choice, 1e3 * steps["fp32"], 1e3 * steps["bf16"], machine,
             speedup)
    return choice
