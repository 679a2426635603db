"""Peak memory from the OS (CPU: VmHWM of /proc/self/status) or from the CUDA allocator, for benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path


def rss(field: str = "VmRSS") -> int:
    """Bytes of /proc/self/status ``field`` (VmRSS now, VmHWM the peak); ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``reset()`` then ``peak()``: the highest memory in use since the reset, on ``device``'s side.

    CPU: the process's resident set (the kernel's VmHWM, reset through /proc/self/clear_refs).
    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; the caching allocator's slack is not counted).
    """

    def __init__(self, device) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def now(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device) if self.cuda else rss("VmRSS")

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return rss("VmHWM")


def run_child(cmd: list[str]) -> dict:
    """A benchmark arm run as its own process (so its peak memory is its own; progress bars off): the last JSON
    object it printed. Exits with its stderr's tail when it fails."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit_rows(path: str | Path, rows: list[dict]) -> None:
    """Print ``rows`` one JSON object per line and append them to the JSONL file ``path``."""
    import json

    with Path(path).open("a") as f:
        for row in rows:
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
