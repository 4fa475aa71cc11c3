#!/usr/bin/env bash
# The instruction budget (bench/budget/instructions.txt), checked: runs the
# callgrind per-request scripts on fixed scenarios and fails when one
# exceeds its budget. Prints measured against budget for each. Needs
# valgrind, nginx and wrk. CI runs it (.ci/run).
#
#   bench/scripts/instruction-budget.sh [seconds]   (default 8, as CI; budgets are set at 8)
set -euo pipefail
secs=${1:-8}
here=$(cd "$(dirname "$0")" && pwd)
budgets="$here/../budget/instructions.txt"
budget() { awk -v s="$1" '$1 == s { print $2 }' "$budgets"; }
measured=()
line=$("$here/callgrind-per-request.sh" "$secs" | tail -1)
measured+=("http1-keepalive ${line##*per_request=}")
while read -r path rest; do
  measured+=("${path%:}-inbound ${rest##*per_request=}")
done < <("$here/callgrind-mtls.sh" "$secs" | grep per_request=)
failed=0
for m in "${measured[@]}"; do
  read -r scenario got <<< "$m"
  want=$(budget "$scenario")
  if [ -z "$want" ]; then
    echo "instruction budget: no budget for $scenario in $budgets (measured $got)"; failed=1; continue
  fi
  if [ "$got" -le "$want" ]; then verdict=ok; else verdict="OVER BUDGET"; failed=1; fi
  printf 'instruction budget: %-16s %8s instructions/request, budget %8s: %s\n' "$scenario" "$got" "$want" "$verdict"
done
exit "$failed"
