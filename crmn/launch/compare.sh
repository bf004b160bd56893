#!/usr/bin/env bash
# The last job of a CRMN grid on Slurm, started after every array task ended (afterany, so a
# failed run does not block the report): prints the comparison, lists the manifest's runs
# that did not finish (then exits 1), and leaves its exit code in EXP_DIR/slurm/compare.rc
# for `--wait` (sacct would need slurmdbd).
#     sbatch --dependency=afterany:ARRAY_ID ... compare.sh ENTRY EXP_DIR
set -uo pipefail

entry=$1 exp_dir=$2
rc_file="$exp_dir/slurm/compare.rc"
rm -f "$rc_file"
echo "[compare] $(date '+%F %T') on $(hostname -s): bash $entry compare $exp_dir"
bash "$entry" compare "$exp_dir"
rc=$?
echo "$rc" >"$rc_file.tmp" && mv -f "$rc_file.tmp" "$rc_file"
echo "[compare] $(date '+%F %T') exit $rc"
exit "$rc"
