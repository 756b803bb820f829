#!/usr/bin/env python3
"""The `rust-version` each feature needs, read from the dependency tree (`cargo metadata`,
the locked versions): the highest `rust-version` any dependency built with that feature
declares. Fails when it is above what the docs state (`Cargo.toml`'s `rust-version`; with
`postgres`, 1.94). Only the stable toolchain is installed where CI runs, so an older compiler
cannot be run; this checks what the dependencies say they need, and the crate itself is
edition 2024 (1.85)."""
import json, subprocess, sys

STATED = {"postgres": (1, 94)}  # features that need more than the crate's rust-version

def needed(features):
    args = ["cargo", "metadata", "--format-version", "1", "--locked"]
    if features:
        args += ["--features", features]
    meta = json.loads(subprocess.check_output(args, stderr=subprocess.DEVNULL))
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(i for i, p in packages.items() if p["name"] == "tower-idempotency")
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for dep in nodes[node]["deps"]:
            if any(kind["kind"] in (None, "build") for kind in dep["dep_kinds"]):
                stack.append(dep["pkg"])
    best = ((0, 0), "")
    for node in seen - {root}:
        version = packages[node].get("rust_version")
        if version:
            key = tuple(int(x) for x in version.split(".")[:2])
            best = max(best, (key, packages[node]["name"]))
    return best, packages[root]

(_, root) = needed("")
crate = tuple(int(x) for x in root["rust_version"].split(".")[:2])
failed = False
for feature in [""] + sorted(root["features"]):
    if feature == "default":
        continue
    (version, name), _ = needed(feature)
    stated = max(crate, STATED.get(feature, crate))
    ok = version <= stated
    failed |= not ok
    print(f"{feature or '(no feature)':14} needs {version[0]}.{version[1]} ({name}); stated {stated[0]}.{stated[1]}: {'ok' if ok else 'NOT MET'}")
sys.exit(1 if failed else 0)
