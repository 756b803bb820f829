#!/usr/bin/env bash
# Fails when the crate's generated docs show a link as literal brackets: an intra-doc link
# rustdoc resolved to another crate's item but could not give a URL (with `--no-deps`, no
# dependency has local docs), or one it could not resolve at all. Link such items with their
# docs.rs URL: [`PgPool`](https://docs.rs/sqlx/0.9/sqlx/type.PgPool.html).
# Run after `cargo doc --no-deps --all-features`. Trait implementations and methods from
# `Deref` are cut off: their docs are the other crates' own.
set -euo pipefail
cd "$(dirname "$0")/.."
doc="${CARGO_TARGET_DIR:-target}/doc/tower_idempotency"
[ -d "$doc" ] || { echo "no docs at $doc: run cargo doc --no-deps --all-features first" >&2; exit 2; }
found=0
while IFS= read -r -d '' page; do
  hits=$(tr '\n' ' ' < "$page" | sed -E 's/id="(deref-methods|trait-implementations|synthetic-implementations|blanket-implementations|implementors)[^"]*".*//' \
    | grep -oE '\[<code>[^<]*</code>\]|\[[A-Z][A-Za-z0-9_]*(::[A-Za-z0-9_]+)+\]' || true)
  if [ -n "$hits" ]; then
    found=1
    echo "${page#"$doc"/}: $(echo "$hits" | sort -u | tr '\n' ' ')"
  fi
done < <(find "$doc" -name '*.html' -print0)
if [ "$found" = 1 ]; then
  echo "links rendered as brackets (above): give them a URL" >&2
  exit 1
fi
echo "doc links: none rendered as brackets"
