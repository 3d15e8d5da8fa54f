"""Forward + backward time of our ECAPA-TDNN (training mode, CPU) on one batch of features (prints JSON with --json).

Default: the 3dspeaker variant with C=512 on (batch 8, 200 frames, 80 mels), and the wespeaker variant on the
same input. With `--peer-3dspeaker PATH` (a checkout of github.com/modelscope/3D-Speaker) it also times
3D-Speaker's own ECAPA_TDNN, loaded from that checkout, on the same input in the same run: the baseline.
Repetitions alternate between the models so that load drift on a shared machine hits them alike.

    python benchmarks/model.py --json [--peer-3dspeaker ~/src/3D-Speaker]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from ecapa_accel.model import EcapaTdnn

PEER_MODEL_FILE = "speakerlab/models/ecapa_tdnn/ECAPA_TDNN.py"


def load_3dspeaker(checkout: Path, n_mels: int, channels: int, embed_dim: int) -> torch.nn.Module:
    """3D-Speaker's ECAPA_TDNN built as its VoxCeleb recipe builds it, from the user's checkout."""
    spec = importlib.util.spec_from_file_location("speakerlab_ecapa_tdnn", checkout / PEER_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ECAPA_TDNN(n_mels, channels=[channels] * 4 + [3 * channels], lin_neurons=embed_dim)


def step_seconds(model: torch.nn.Module, feats: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(feats).square().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peer-3dspeaker", type=Path, default=None, help="3D-Speaker checkout to time as baseline")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    feats = torch.randn(args.batch, args.frames, 80)
    models = {
        "3dspeaker": EcapaTdnn(80, args.channels, 192, "3dspeaker").train(),
        "wespeaker": EcapaTdnn(80, args.channels, 192, "wespeaker").train(),
    }
    if args.peer_3dspeaker is not None:
        models["peer_3dspeaker"] = load_3dspeaker(args.peer_3dspeaker, 80, args.channels, 192).train()
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up: allocator and kernel selection
        step_seconds(model, feats)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_seconds(model, feats))

    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "frames": args.frames,
        "channels": args.channels,
        "repeats": args.repeats,
        "median_s": {name: round(statistics.median(values), 4) for name, values in times.items()},
        "min_s": {name: round(min(values), 4) for name, values in times.items()},
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
    }
    if "peer_3dspeaker" in times:
        report["ours_over_peer_3dspeaker"] = round(
            statistics.median(times["3dspeaker"]) / statistics.median(times["peer_3dspeaker"]), 3
        )
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
