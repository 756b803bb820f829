#!/usr/bin/env bash
# The instruction-count guard: instructions per request on every path (scripts/profile.sh,
# callgrind: deterministic, so it holds on a noisy machine) against the baseline committed in
# benches/instructions.baseline.
#
# Usage: scripts/instructions.sh            check: fails when a path costs more than 3 % over
#                                           its baseline (prints every path's figures)
#        scripts/instructions.sh --update   measure and rewrite the baseline (then commit it,
#                                           saying why the figures moved)
#
# Environment: REQUESTS (default 1000 a path), THRESHOLD (default 3, percent).
#
# The counts include SHA-256, which valgrind's CPU runs in software (the real CPU's SHA-NI is
# ~10x cheaper), so a change in the digests weighs more here than in time; the "without
# SHA-256" column shows the rest. They depend on the compiler: the baseline records the rustc
# it was measured with, and the check says when the current one differs (regenerate it with
# --update in a commit of its own after a toolchain change).
set -euo pipefail
cd "$(dirname "$0")/.."

baseline=benches/instructions.baseline
requests="${REQUESTS:-1000}"
threshold="${THRESHOLD:-3}"
mode=check
case "${1:-}" in
  "") ;;
  --update) mode=update ;;
  *) echo "usage: scripts/instructions.sh [--update]" >&2; exit 2 ;;
esac

scripts/profile.sh "$requests" >&2
measured="${CARGO_TARGET_DIR:-target}/profile/instructions.txt"
rustc_version=$(rustc -V)

if [ "$mode" = update ]; then
  {
    echo "# Instructions per request on each path (scripts/profile.sh $requests under callgrind):"
    echo "# path, instructions per request, of which SHA-256. Checked in CI by scripts/instructions.sh,"
    echo "# which fails when a path grows by more than ${threshold} %. Regenerate with"
    echo "# scripts/instructions.sh --update, in a commit that says why the figures moved."
    echo "# rustc: $rustc_version"
    cat "$measured"
  } >"$baseline"
  echo "wrote $baseline:" >&2
  cat "$baseline"
  exit 0
fi

[ -f "$baseline" ] || { echo "no $baseline: create it with scripts/instructions.sh --update" >&2; exit 1; }
python3 - "$baseline" "$measured" "$threshold" "$rustc_version" <<'PY'
import sys

baseline_path, measured_path, threshold, rustc = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

def read(path):
    rows, meta = {}, {}
    for line in open(path):
        line = line.strip()
        if line.startswith("# rustc:"):
            meta["rustc"] = line.split(":", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        name, total, sha = line.split()
        rows[name] = (int(total), int(sha))
    return rows, meta

base, meta = read(baseline_path)
now, _ = read(measured_path)
if meta.get("rustc") and meta["rustc"] != rustc:
    print(f"note: the baseline was measured with {meta['rustc']}, this is {rustc}; a toolchain change moves "
          "every count (regenerate the baseline in a commit of its own)")
print(f"{'path':<18} {'baseline':>10} {'now':>10} {'change':>8} {'without SHA-256':>16} {'change':>8}")
failed = []
for name in sorted(set(base) | set(now), key=lambda n: list(now).index(n) if n in now else len(now)):
    if name not in now:
        print(f"{name:<18} {base[name][0]:>10,} {'(not measured)':>10}")
        failed.append(f"{name}: in the baseline, not measured")
        continue
    if name not in base:
        print(f"{name:<18} {'(new)':>10} {now[name][0]:>10,}")
        failed.append(f"{name}: measured, not in the baseline")
        continue
    (b, bsha), (n, nsha) = base[name], now[name]
    change = (n - b) / b * 100
    nosha = ((n - nsha) - (b - bsha)) / (b - bsha) * 100
    flag = "  <- over" if change > threshold else ""
    print(f"{name:<18} {b:>10,} {n:>10,} {change:>+7.1f}% {n - nsha:>16,} {nosha:>+7.1f}%{flag}")
    if change > threshold:
        failed.append(f"{name}: {b:,} -> {n:,} instructions per request ({change:+.1f} %, over {threshold:g} %)")
if failed:
    print()
    print("instruction guard FAILED:")
    for line in failed:
        print(f"  {line}")
    print("If the growth is wanted (a feature that costs what it costs), regenerate the baseline with")
    print("scripts/instructions.sh --update and commit it on its own, saying why the figures moved.")
    sys.exit(1)
print(f"instruction guard: every path within {threshold:g} % of the baseline")
PY
