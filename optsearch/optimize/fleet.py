"""`optsearch worker --devices all|0,1,3`: one worker process per device, stopped together.

Each device gets its own `optsearch worker --device cuda:N` process (its own CUDA context,
baseline timing and heartbeat). The children run in their own process group, so a Ctrl-C reaches
only this parent, which hands one SIGINT to each child: every running trial is failed and
re-queued, and the command exits 130 once all children have.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from optsearch.errors import UsageError
from optsearch.study_spec import check_device

EXIT_INTERRUPTED = 130


def parse_devices(text: str) -> list[str]:
    """'all' -> every CUDA device; '0,1,3' -> cuda:0, cuda:1, cuda:3; 'cpu' and 'cuda:N' as is."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        if count == 0:
            raise UsageError("--devices all: no CUDA device here (use --device cpu for one CPU worker)")
        return [f"cuda:{index}" for index in range(count)]
    devices = []
    for item in (part.strip() for part in text.split(",")):
        device = f"cuda:{item}" if item.isdigit() else item
        problem = check_device(device) if device not in ("auto", "cuda") else f"{device!r} is not one device"
        if problem:
            raise UsageError(f"--devices {text}: {problem} (allowed: all, or a list like 0,1,3)")
        if device.startswith("cuda:") and int(device[5:]) >= count:
            raise UsageError(f"--devices {text}: {device} does not exist ({count} CUDA devices)")
        devices.append(device)
    if not devices:
        raise UsageError("--devices: name at least one device")
    return devices


def without_devices(argv: list[str]) -> list[str]:
    """The worker's own arguments without --devices (each child gets --device instead)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--devices":
            skip = True
        elif not item.startswith("--devices="):
            kept.append(item)
    return kept


def shared_device_warning(devices: list[str]) -> str | None:
    """Several workers on one device (CPU cores, or one GPU named twice) time each other's load,
    not their settings: one line for each kind of sharing."""
    warnings = []
    cpus = devices.count("cpu")
    if cpus >= 2:
        warnings.append(f"warning: {cpus} CPU workers share this machine's {os.cpu_count()} cores: "
                        "each times the others' load too (baselines and speedups disturbed, "
                        "impossible figures re-timed); one CPU worker per machine measures honestly")
    shared = sorted({d for d in devices if d != "cpu" and devices.count(d) > 1})
    if shared:
        warnings.append(f"warning: {', '.join(shared)} named more than once: workers sharing a GPU "
                        "time each other's kernels too (baselines and speedups disturbed); one "
                        "worker per GPU measures honestly")
    return "\n".join(warnings) or None


def run_workers(argv: list[str], devices: list[str]) -> int:
    """Start one worker per device with `argv`; wait for all; forward Ctrl-C/SIGTERM once."""
    if warning := shared_device_warning(devices):
        print(warning, file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "optsearch.cli", *without_devices(argv)]
    children = [subprocess.Popen([*command, "--device", device], start_new_session=True)
                for device in devices]
    interrupted = False

    def stop(signum, frame) -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return EXIT_INTERRUPTED
    return next((code for code in codes if code != 0), 0)
