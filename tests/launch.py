"""Helpers for tests that start the CLI or torchrun in subprocesses.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nobody listens on now (tests of several checkouts may run at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """This checkout on the path, no progress bars, one thread per process (the cores are shared)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def saved_step(checkpoint: Path) -> int:
    """The global step of the checkpoint a running job last saved, 0 if none yet. Where the folder
    is swapped by two renames rather than one exchange (`smallmighty.io.atomic_path`), the old side
    is read in between."""
    from smallmighty.io import set_aside_path

    for folder in (checkpoint, set_aside_path(checkpoint)):
        try:
            return json.loads((folder / "state.json").read_text())["global_step"]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return 0


def kill_once_saved(cmd: list[str], checkpoint: Path, step: int, timeout: float) -> int:
    """Run `cmd` and SIGKILL it as soon as its checkpoint in `checkpoint` holds `step` or a later one;
    returns the step saved when it died."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if saved_step(checkpoint) >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return saved_step(checkpoint)


def assert_same_weights(a: Path, b: Path) -> None:
    """The two folders' model.safetensors hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name


_RANK_REPORT = """
import json as _json, os as _os, torch as _torch
from accelerate import PartialState as _PartialState
_state = _PartialState()
_flat = _torch.cat([p.detach().flatten() for p in module.parameters()])
with open(_os.path.join({folder!r}, f"rank{{_state.process_index}}.json"), "w") as _f:
    _json.dump({{"world": _state.num_processes, "sum": _flat.double().sum().item(),
                "sq": _flat.double().pow(2).sum().item(), **report}}, _f)
"""


def run_on_two_ranks(body: str, folder: Path, timeout: float = 300) -> list[dict]:
    """Run the Python `body` under `torchrun --nproc_per_node 2` on CPUs and check that both ranks end
    with the same weights. `body` leaves the trained `module` and a JSON-able `report` dict; each rank's
    report (with "world", and the weights' "sum" and "sq") is returned, rank 0 first."""
    script = folder / "two_ranks.py"
    script.write_text(body + _RANK_REPORT.format(folder=str(folder)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script)],
                            env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((folder / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sum"] == ranks[1]["sum"] and ranks[0]["sq"] == ranks[1]["sq"]
    return ranks
