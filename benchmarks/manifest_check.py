"""`data check` speed: manifest rows validated per second, against a baseline measured in the same run.

Ours: `check_manifests` on a generated manifest of N distinct wav files (load through `datasets`, column and
value checks, duplicate IDs, every file's header, segment bounds, summary) in three states: cold (the CSV is
converted to Arrow and every header read), headers uncached (Arrow cached, the audio header cache deleted: what
every restart cost before that cache) and warm (both cached: a restart now, one `os.stat` per file). The files
are dated an hour back, as an old dataset is (headers of files written in the last 2 s are never trusted).
Baseline: the least any uncached header check can do, a bare loop of `soundfile.info` over the paths read
with the csv module. Files are in the page cache (just written), so this measures our overhead, not the disk.
Target: >= 5,000 rows/s.

    python benchmarks/manifest_check.py --json
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile


def write_manifest(root: Path, rows: int, hard_links: bool) -> Path:
    """`rows` distinct wav files, or with `hard_links` one file per 50,000 rows linked under every name (a
    VoxCeleb2-sized list of paths in minutes; headers then come from a few page-cached inodes)."""
    rng = np.random.default_rng(0)
    manifest = root / "check.csv"
    hour_ago = time.time_ns() - 3600 * 10**9
    source = None
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "path", "spk", "dur"])
        for i in range(rows):
            relative = Path(f"id{i // 50:05d}") / f"{i:07d}.wav"
            (root / relative).parent.mkdir(exist_ok=True)
            if hard_links and i % 50_000:  # ext4 allows 65,000 links to a file
                os.link(source, root / relative)
            else:
                soundfile.write(root / relative, (0.1 * rng.standard_normal(1600)).astype(np.float32), 16000,
                                subtype="PCM_16")
                os.utime(root / relative, ns=(hour_ago, hour_ago))
                source = root / relative
            writer.writerow([f"u{i}", relative.as_posix(), relative.parent.name, "0.1"])
    return manifest


def bare_header_loop(manifest: Path) -> float:
    started = time.perf_counter()
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            soundfile.info(os.path.join(manifest.parent, row["path"]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the manifest, one path each")
    parser.add_argument("--hard-links", action="store_true", help="one wav file linked under every path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")  # a cold cache for the first check
        from ecapa_accel.data import check_manifests

        manifest = write_manifest(root, args.rows, args.hard_links)
        baseline_s = bare_header_loop(manifest)

        def timed_check() -> tuple[float, list[str]]:
            started = time.perf_counter()
            summary = check_manifests([manifest])
            return time.perf_counter() - started, summary

        rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cold_s, summary = timed_check()
        uncached_s = []
        for _ in range(2):
            for cache in glob.glob(str(root / "hf-cache" / "**" / "audio-headers-*.arrow"), recursive=True):
                os.unlink(cache)
            uncached_s.append(timed_check()[0])
        warm_s, warm_summary = min(timed_check() for _ in range(3))
        assert warm_summary == summary, (warm_summary, summary)
    uncached = min(uncached_s)
    report = {
        "rows": args.rows,
        "ours_cold_rows_per_s": round(args.rows / cold_s),
        "ours_headers_uncached_rows_per_s": round(args.rows / uncached),
        "ours_warm_rows_per_s": round(args.rows / warm_s),
        "ratio_warm_vs_headers_uncached": round(uncached / warm_s, 2),
        "baseline_bare_soundfile_info_rows_per_s": round(args.rows / baseline_s),
        "ratio_warm_vs_baseline": round(baseline_s / warm_s, 2),
        "target_rows_per_s": 5000,
        "peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb),
        "files": "one, hard-linked" if args.hard_links else "distinct",
        "summary": summary[0].split(": ", 1)[1],
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
