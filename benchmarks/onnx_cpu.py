"""Embedding time on the CPU: onnxruntime on `EcapaEncoder.to_onnx`'s model.onnx vs PyTorch, same features.

Usage: python benchmarks/onnx_cpu.py [--json] [--channels 1024] [--seconds 3,10] [--batch 1] [--repeats 5]
                                     [--threads N]
The network (randomly initialised, 80 mels, 192-d) embeds features of utterances of each length in `--seconds`;
PyTorch runs under `torch.inference_mode()`, onnxruntime with the CPU provider and as many intra-op threads as
torch uses. Times are the best of `--repeats` interleaved runs (the machine is shared and noisy); the baseline
is PyTorch in the same run. The front end (fbank) is outside both and not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from ecapa_accel.config import FeaturesConfig
from ecapa_accel.encoder import EcapaEncoder
from ecapa_accel.model import EcapaTdnn
from _report import emit


def _time_into(fn, repeats_done: list[float]) -> None:
    start = time.perf_counter()
    fn()
    repeats_done.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--seconds", default="3,10", help="comma-separated utterance lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both (default: torch's choice)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = EcapaEncoder(EcapaTdnn(n_mels=80, channels=args.channels, embed_dim=192), FeaturesConfig()).eval()
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    report = {"channels": args.channels, "batch": args.batch, "threads": threads,
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        path = encoder.to_onnx(Path(folder) / "model.onnx")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for seconds in (float(s) for s in args.seconds.split(",")):
            waves = 0.1 * torch.randn(args.batch, int(seconds * 16000), generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                features = encoder.front_end(waves)
            array = features.numpy()
            with torch.inference_mode():
                reference = encoder.model(features)  # also the warm-up of both
            onnx_out = torch.from_numpy(session.run(["embedding"], {"features": array})[0])
            times = {"torch": [], "onnx": []}
            runs = {"torch": lambda: encoder.model(features), "onnx": lambda: session.run(["embedding"],
                                                                                           {"features": array})}
            with torch.inference_mode():
                for repeat in range(args.repeats):
                    for name in ("torch", "onnx") if repeat % 2 else ("onnx", "torch"):  # alternate the order
                        _time_into(runs[name], times[name])
            torch_s, onnx_s = min(times["torch"]), min(times["onnx"])
            key = f"{seconds:g}s"
            report[f"torch_ms_{key}"] = round(1000 * torch_s, 2)
            report[f"onnx_ms_{key}"] = round(1000 * onnx_s, 2)
            report[f"speedup_{key}"] = round(torch_s / onnx_s, 3)  # > 1: onnxruntime is faster
            report[f"min_cosine_{key}"] = float(torch.cosine_similarity(onnx_out, reference, dim=1).min())
    emit(report, args.json)


if __name__ == "__main__":
    main()
