"""CUDA MPS for runs that share a GPU (``--runs-per-gpu K``): one control daemon per user and
machine, pipes and logs under ``/tmp/crmn-mps-<uid>`` (short: socket paths hold about 100
bytes). Its launcher stops it at the end; one a SIGKILLed launcher left is stopped at the next
launch; one a live launcher (or the machine's owner) runs is used as it is, never a second."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

from crmn.launch import status

CONTROL = "nvidia-cuda-mps-control"
OWNER = "launcher.pid"  # the PID of the launcher that started the daemon


def _control(env: Dict[str, str], *args: str, command: str = "") -> int:
    """``nvidia-cuda-mps-control ARGS`` (``command`` on its stdin, as the daemon reads it)."""
    p = status.run_quiet([CONTROL, *args], timeout=60, input=command, env={**os.environ, **env})
    return p.returncode if p else -1


@contextlib.contextmanager
def daemon() -> Iterator[Tuple[Dict[str, str], str]]:
    """An MPS control daemon while the block runs: the runs' environment and a note."""
    if shutil.which(CONTROL) is None:
        yield {}, f"no MPS ({CONTROL} not found): the runs share each GPU plainly"
        return
    root = Path(tempfile.gettempdir()) / f"crmn-mps-{os.getuid()}"
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    owner, note = root / OWNER, "MPS daemon "
    try:
        starter = int(owner.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        starter = None
    if _control(env, command="get_server_list") == 0:
        if starter is not None and not status.pid_alive(starter):
            _control(env, command="quit")  # its launcher was killed: nobody else stops it
            owner.unlink(missing_ok=True)
            note = f"stale MPS daemon of launcher {starter} (killed) stopped; MPS daemon "
        else:
            who = f"launcher {starter}" if starter else "another process"
            yield env, f"MPS: using the daemon {who} runs (pipes {env['CUDA_MPS_PIPE_DIRECTORY']})"
            return
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True, mode=0o700)
    if _control(env, "-d") != 0:
        yield {}, f"no MPS ({CONTROL} -d failed): the runs share each GPU plainly"
        return
    owner.write_text(f"{os.getpid()}\n")
    try:
        yield env, note + f"started (pipes {env['CUDA_MPS_PIPE_DIRECTORY']}; stopped when " \
                          "this launcher ends)"
    finally:  # normally, on a stop request, a failed run or an exception alike
        _control(env, command="quit")
        owner.unlink(missing_ok=True)
