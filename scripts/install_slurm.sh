#!/usr/bin/env bash
# Installs a one-node-capable Slurm (Debian's slurmctld, slurmd, slurm-client and munge) when
# sbatch is missing, so that the launcher tests run against a real scheduler. Idempotent and
# quiet: it does nothing when sbatch is already on PATH. Needs root and apt-get (CI's Debian
# machine); elsewhere it says what to install and exits non-zero.
set -euo pipefail

if command -v sbatch >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: sbatch not found and cannot install it here (needs root and apt-get);" \
       "install slurmctld slurmd slurm-client munge yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# another apt (scripts/ensure_env.sh installing OpenBLAS at the same moment) holds dpkg's
# lock for a while: wait for it rather than fail
apt-get update -qq >/dev/null 2>&1 || echo "install_slurm: apt-get update failed; trying the cached lists" >&2
if ! apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
    >/dev/null 2>&1; then
  echo "install_slurm: apt-get install slurmctld slurmd slurm-client munge failed: run that apt-get command by hand to see why, or install Slurm yourself" >&2
  exit 1
fi
command -v sbatch >/dev/null 2>&1 || { echo "install_slurm: installed, yet sbatch is not on PATH; add the Slurm bin folder to PATH" >&2; exit 1; }
