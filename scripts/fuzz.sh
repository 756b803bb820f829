#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time and prints the executions it ran.
#
#   scripts/fuzz.sh            # 60 s per target
#   FUZZ_SECONDS=600 scripts/fuzz.sh key_parse
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo fuzz passes nightly-only flags to rustc
# (-Zsanitizer=address, ...); on a stable toolchain RUSTC_BOOTSTRAP=1 lets it do so. Findings
# land in fuzz/artifacts/<target>/; the corpus grows in fuzz/corpus/<target>/ (both ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(key_parse layer)

export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
  log="$(mktemp)"
  echo "== fuzz target $target for ${seconds}s"
  if cargo fuzz run "$target" -O -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    result="no findings"
  else
    result="FAILED: see $log and fuzz/artifacts/$target/"
    status=1
  fi
  runs=$( (grep -E '^stat::number_of_executed_units' "$log" || true) | awk '{print $2}' | tail -1)
  cov=$( (grep -E '^#[0-9]+.*cov:' "$log" || true) | tail -1 | sed -E 's/.*cov: ([0-9]+).*/\1/')
  corpus=$(find "corpus/$target" -type f 2>/dev/null | wc -l)
  echo "   executions: ${runs:-?} in ${seconds}s, coverage: ${cov:-?} edges, corpus: ${corpus} inputs, ${result}"
  [ "$status" -eq 0 ] && rm -f "$log"
done
exit "$status"
