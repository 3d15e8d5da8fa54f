"""`data check` speed: manifest rows validated per second, against a baseline measured in the same run.

Ours: `check_manifests` on a generated manifest of N distinct wav files (load through `datasets`, column and
value checks, duplicate IDs, every file's header with soundfile.info, segment bounds, summary), first with a
cold `datasets` cache (the CSV is converted to Arrow) and then warm. Baseline: the least any header check can
do, a bare loop of `soundfile.info` over the paths read with the csv module. Files are in the page cache
(just written), so this measures our overhead, not the disk. Target: >= 5,000 rows/s.

    python benchmarks/manifest_check.py --json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_manifest(root: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    manifest = root / "check.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "path", "spk", "dur"])
        for i in range(rows):
            relative = Path(f"id{i // 50:05d}") / f"{i:06d}.wav"
            (root / relative).parent.mkdir(exist_ok=True)
            soundfile.write(root / relative, (0.1 * rng.standard_normal(1600)).astype(np.float32), 16000,
                            subtype="PCM_16")
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
    parser.add_argument("--rows", type=int, default=10_000, help="rows (distinct wav files) in the manifest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")  # a cold cache for the first check
        from ecapa_accel.data import check_manifests

        manifest = write_manifest(root, args.rows)
        baseline_s = bare_header_loop(manifest)
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            summary = check_manifests([manifest])
            timings.append(time.perf_counter() - started)
    report = {
        "rows": args.rows,
        "ours_cold_cache_rows_per_s": round(args.rows / timings[0]),
        "ours_warm_cache_rows_per_s": round(args.rows / timings[1]),
        "baseline_bare_soundfile_info_rows_per_s": round(args.rows / baseline_s),
        "ratio_warm_vs_baseline": round(baseline_s / timings[1], 2),
        "target_rows_per_s": 5000,
        "summary": summary[0].split(": ", 1)[1],
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
