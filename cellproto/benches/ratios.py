#!/usr/bin/env python3
"""Prints cellproto's throughput as a fraction of raw AEAD, from the last `cargo bench -p
cellproto --bench onion` run (criterion's estimates in target/criterion). Same run, same
machine, so the ratio is what to compare, not the absolute times."""
import json, pathlib, sys

root = pathlib.Path(__file__).resolve().parents[2] / "target" / "criterion"

def median_ns(group, bench, suite):
    path = root / group / f"{bench}_{suite}" / "new" / "estimates.json"
    return json.loads(path.read_text())["median"]["point_estimate"]

ok = True
for group in ("forward_open_batch64", "backward_seal_batch64"):
    for suite in ("aes-256-gcm", "chacha20-poly1305"):
        try:
            ours, raw = median_ns(group, "cellproto", suite), median_ns(group, "raw_aead", suite)
        except FileNotFoundError:
            ok = False
            continue
        print(f"{group:24} {suite:18} cellproto {ours/1000:7.1f} us  raw {raw/1000:7.1f} us  "
              f"ratio {raw/ours:.2f} of raw  ({ours/64:.0f} vs {raw/64:.0f} ns/cell)")
sys.exit(0 if ok else 1)
