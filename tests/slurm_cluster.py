"""A real one-node Slurm cluster for the launcher tests, started as plain background processes.

:class:`SlurmCluster` writes a ``slurm.conf`` into a private folder, starts ``munged`` (as the
``munge`` user, with its own key and socket), ``slurmctld -D`` and ``slurmd -D``, waits until
the node is idle, and stops everything it started by PID. Nothing of a previous session is
reused: no systemd, no system socket, no saved state; two clusters can run side by side.

Clients (``sbatch``, ``squeue``, ``scontrol`` ...) find the cluster through ``SLURM_CONF``:
use :meth:`SlurmCluster.env`.

Settings and why (measured on Debian 12's Slurm 22.05):

- ``DefMemPerCPU``: without it a job that asks no ``--mem`` takes the node's whole memory,
  and array tasks then run one at a time.
- ``AuthInfo=...,cred_expire=10``: a requeued batch job waits ``cred_expire`` seconds before
  it may start again (120 s by default).
- ``SchedulerParameters=sched_interval=2``: the main scheduling loop (which starts requeued
  tasks and jobs whose dependency was just met) runs every 2 s instead of 60 s.
- ``proctrack/linuxproc``, ``task/none``: no cgroups needed (containers rarely grant them).
- no accounting (``accounting_storage/none``): ``sacct`` does not work, and the launcher does
  not use it.

Run ``python tests/slurm_cluster.py`` to start one by hand; it prints the ``SLURM_CONF`` to
export and stops the cluster on Ctrl-C.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_available() -> Optional[str]:
    """None when the daemons and clients are installed, else a sentence saying what lacks."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "sinfo", "slurmctld", "slurmd",
                           "munged", "mungekey") if shutil.which(c) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH); "
                f"run `bash scripts/install_slurm.sh` as root")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (reinstall the munge package)"
    if os.geteuid() != 0:
        return "a test cluster needs root (slurmd runs jobs as their owner)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kb // 1024 - 512  # leave the system some room; slurmd refuses more than it sees


class SlurmCluster:
    """A one-node cluster in ``root`` (a fresh temporary folder when not given)."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="crmn-slurm-"))
        self.root.chmod(0o755)  # the munge user must reach its socket below
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self.cpus = len(os.sched_getaffinity(0))
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"

    # -- set-up --------------------------------------------------------------------------

    def env(self) -> Dict[str, str]:
        """The environment of a client of this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        r = self.root
        mem = _mem_mb()
        for d in ("state", "spool"):
            (r / d).mkdir(exist_ok=True)
        self.conf.write_text(f"""\
# one-node test cluster written by tests/slurm_cluster.py
ClusterName=crmntest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_dir / 'munge.socket'},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
DefMemPerCPU={mem // (4 * self.cpus)}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munged(self) -> None:
        """munged as the munge user, with a private key and socket under ``root``."""
        m = self.munge_dir
        m.mkdir(mode=0o700, exist_ok=True)
        key = m / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                           capture_output=True)
        user = pwd.getpwnam("munge")
        for p in (m, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        key.chmod(0o400)
        m.chmod(0o755)  # clients (root, job owners) connect to the socket inside
        self._spawn("munged", ["munged", "--foreground", f"--socket={m / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"], user="munge")
        self._wait_for(lambda: (m / "munge.socket").exists(), "munged's socket", 20)

    def _spawn(self, name: str, argv: List[str], **kw) -> None:
        out = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env(), stdin=subprocess.DEVNULL, **kw)
        out.close()

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for "
                                       f"{what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def node_state(self) -> str:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                           env=self.env(), timeout=20)
        return p.stdout.strip() if p.returncode == 0 else ""

    def start(self, timeout: float = 90) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self._write_conf()
        try:
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            self._spawn("slurmd", ["slurmd", "-D"])
            self._wait_for(lambda: self.node_state() == "idle", "the node to be idle", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    # -- tear-down -----------------------------------------------------------------------

    def _cancel_jobs(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until they are gone (so that no
        slurmstepd outlives slurmd)."""
        env = self.env()
        q = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                           env=env, timeout=20)
        ids = q.stdout.split() if q.returncode == 0 else []
        if not ids:
            return
        subprocess.run(["scancel", *ids], capture_output=True, env=env, timeout=20)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                               env=env, timeout=20)
            if q.returncode != 0 or not q.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged by PID (TERM, then KILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self._cancel_jobs()
            except (OSError, subprocess.SubprocessError):
                pass  # stopping must go on: the daemons below are ours to end
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def logs(self, tail: int = 15) -> str:
        """The last lines of every daemon's log, for failure messages."""
        out = []
        for path in [self.root / "slurmctld.log", self.root / "slurmd.log",
                     self.munge_dir / "munged.log",
                     *(self.root / f"{n}.stdout" for n in DAEMONS)]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    reason = slurm_available()
    if reason:
        raise SystemExit(reason)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # TERM stops it cleanly too
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
