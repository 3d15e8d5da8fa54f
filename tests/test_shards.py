"""Packed audio shards: pack and check, the same samples as the CSV, block-wise reading (local and over HTTP on
loopback), shuffle quality, damaged shards, bad inputs, exact resume from shards."""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import datasets
import numpy as np
from conftest import cli, run_cli
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import yaml
from safetensors.torch import load_file

from ecapa_accel.config import config_from_dict
from ecapa_accel.data import ShardDataset, build_training_data, pack_manifest, shards
from ecapa_accel.data.mixing import block_shuffled_rows
from ecapa_accel.errors import UserError


class RangeServer:
    """A static file server on loopback that answers HTTP range requests, adds `delay` seconds to every
    request and records each one as (method, path, range header)."""

    def __init__(self, root: Path, delay: float = 0.0):
        self.root, self.delay, self.requests = Path(root), delay, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                server.requests.append((self.command, unquote(urlparse(self.path).path), self.headers["Range"]))
                time.sleep(server.delay)
                path = server.root / unquote(urlparse(self.path).path).lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                first, last = 0, size - 1
                ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers["Range"] or "")
                if ranged:
                    if ranged.group(1):
                        first, last = int(ranged.group(1)), min(size - 1, int(ranged.group(2) or size - 1))
                    else:
                        first = max(0, size - int(ranged.group(2)))
                    if first >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
                self.end_headers()
                if body:
                    with open(path, "rb") as handle:
                        handle.seek(first)
                        self.wfile.write(handle.read(last - first + 1))

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # socketserver's 5 drops the SYNs of many clients at once: 1 s to retry

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "RangeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path over HTTP on loopback for the test's duration."""
    with RangeServer(tmp_path) as server:
        yield server


def make_config(datasets: list[dict], **data):
    return config_from_dict({"data": {"datasets": datasets, "crop_seconds": 0.25, "num_workers": 0, **data},
                             "train": {"seed": 7}}, "test")


AUGMENTED = {"speed_factors": [0.9, 1.0, 1.1], "augment": {"prob": 0.6, "gain_db": [-6.0, 6.0]},
             "shuffle_window_blocks": 2}


def draw(data, epoch=0, start=0, micro_batch=3, rank=0, world=1, workers=0) -> list[dict]:
    return list(data.batches(epoch, start, micro_batch, rank, world, workers))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def packed(tone_corpus, tmp_path, name="set", block_rows=4, shard_size="40KB", **corpus) -> tuple[Path, Path]:
    """A generated corpus and its pack: (CSV, pack folder)."""
    manifest = tone_corpus(name, **{"speakers": 3, "utterances": 5, "seconds": 0.6, **corpus})
    out = tmp_path / f"{name}-packed"
    pack_manifest(manifest, out, shard_size, block_rows)
    return manifest, out


def test_pack_writes_arrow_shards_an_index_and_leaves_undecodable_files_out(tmp_path, tone_corpus, capsys):
    manifest = tone_corpus("set", speakers=3, utterances=5, seconds=0.6)
    broken = manifest.parent / "spk1" / "utt2.wav"  # CSV row 8
    broken.write_bytes(b"RIFF\x00\x00not really audio" * 10)
    out = tmp_path / "packed"
    code, stdout, _ = run_cli(capsys, "pack", str(manifest), str(out), "--shard-size", "40KB", "--block-rows", "4")
    assert code == 0
    lines = stdout.strip().splitlines()
    assert re.match(rf"{re.escape(str(manifest))} row 8: cannot decode spk1/utt2.wav; left out", lines[0])
    assert re.search(r"packed: 14 rows in \d+ shards .*, 1 undecodable files left out$", lines[-1])

    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 2 and index["rows"] == 14 and index["block_rows"] == 4
    assert sum(shard["rows"] for shard in index["shards"]) == 14 and len(index["shards"]) > 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["index.json", "rows.parquet", *(shard["file"] for shard in index["shards"])])
    first = out / index["shards"][0]["file"]
    batches = list(pa.ipc.open_stream(first.read_bytes()))
    assert len(batches) * 4 == index["shards"][0]["rows"] and {len(b) for b in batches} == {4}  # whole blocks
    # A shard is an Arrow stream as Hugging Face datasets writes them: `Dataset.from_file` opens it.
    table = datasets.Dataset.from_file(str(first))
    assert table["ID"][:4] == ["set-spk0-0", "set-spk0-1", "set-spk0-2", "set-spk0-3"]
    utt1 = (manifest.parent / "spk0" / "utt1.wav").read_bytes()
    assert table[1]["audio"] == utt1 and table["sample_rate"][:4] == [16000] * 4  # the bytes as they were
    catalogue = pq.read_table(out / "rows.parquet")  # where each file lies in its shard
    offset, size = catalogue.column("offset")[1].as_py(), catalogue.column("bytes")[1].as_py()
    assert first.read_bytes()[offset : offset + size] == utt1 and all(catalogue.column("in_place").to_pylist())

    # `data inspect` draws real batches from it.
    config = tmp_path / "inspect.yaml"
    config.write_text(yaml.safe_dump({"data": {"datasets": [{"name": "set", "shards": str(out)}],
                                               "crop_seconds": 0.25, "num_workers": 0}, "train": {"batch_size": 7}}))
    code, stdout, _ = run_cli(capsys, "data", "inspect", str(config), "--batches", "2", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["samples"] == 14 and report["by_dataset"] == {"set": 14}

    # `data check` takes the pack (folder, index file or a glob of its shards) beside CSVs.
    code, stdout, _ = run_cli(capsys, "data", "check", str(out), str(out / "index.json"),
                              str(out / "shard-0000[0].arrow"))
    assert code == 0
    whole, by_index, glob = stdout.strip().splitlines()
    assert f"{out}: 14 rows in {len(index['shards'])} shards" in whole and "3 speakers" in whole
    assert "16000 Hz (14), 1 channel (14), 14 decoded in place (WAV), 0 from bytes" in whole
    assert by_index.split(": ", 1)[1] == whole.split(": ", 1)[1]
    assert f"{index['shards'][0]['rows']} rows in 1 shards" in glob

    # A second run finds the finished pack; another CSV into the same folder is refused.
    code, stdout, _ = run_cli(capsys, "pack", str(manifest), str(out), "--shard-size", "40KB", "--block-rows", "4")
    assert code == 0 and "already packed: 14 rows" in stdout
    other = tone_corpus("other", speakers=2, utterances=2, seconds=0.3)
    code, _, err = run_cli(capsys, "pack", str(other), str(out), "--shard-size", "40KB", "--block-rows", "4")
    assert code == 2 and "holds a finished pack of another CSV" in err and len(err.strip().splitlines()) == 1


def test_a_killed_pack_leaves_no_complete_looking_shard_and_a_rerun_resumes_it(tmp_path, tone_corpus, monkeypatch):
    manifest = tone_corpus("set", speakers=3, utterances=5, seconds=0.6)
    fresh = tmp_path / "fresh"
    pack_manifest(manifest, fresh, "40KB", 4)
    expected = json.loads((fresh / "index.json").read_text())

    out = tmp_path / "killed"
    original = Path.read_bytes
    reads = []

    def dies_on_the_ninth_file(self):
        reads.append(self)
        if len(reads) == 9:  # inside the third shard (at 40KB, one 4-row block per shard)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", dies_on_the_ninth_file)
    with pytest.raises(KeyboardInterrupt):
        pack_manifest(manifest, out, "40KB", 4)
    monkeypatch.undo()
    assert not (out / "index.json").exists()
    complete = sorted(p.name for p in out.glob("shard-*.arrow"))
    assert complete == [shard["file"] for shard in expected["shards"][: len(complete)]] and len(complete) >= 1
    for name in complete:
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    (out / ".shard-00009.arrow.tmp").write_bytes(b"\xff\xff\xff\xff half a shard")  # what SIGKILL leaves
    with pytest.raises(UserError, match=r"killed.*no index.json"):
        build_training_data(make_config([{"name": "set", "shards": str(out)}]))

    lines = pack_manifest(manifest, out, "40KB", 4)
    assert f"resumed ({len(complete)} shards kept)" in lines[-1]
    assert not list(out.glob(".*.tmp"))
    resumed = json.loads((out / "index.json").read_text())
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in expected["shards"]]


def test_the_same_sample_at_each_position_from_the_csv_or_its_shards(tmp_path, tone_corpus):
    manifest, out = packed(tone_corpus, tmp_path)
    from_csv = make_config([{"name": "set", "csv": str(manifest), "shuffle": "blocks", "block_rows": 4}], **AUGMENTED)
    from_shards = make_config([{"name": "set", "shards": str(out)}], **AUGMENTED)
    a, b = build_training_data(from_csv), build_training_data(from_shards)
    assert a.label_map == b.label_map and a.samples_per_epoch == b.samples_per_epoch == 15
    for epoch in (0, 1):
        expected = draw(a, epoch)
        assert_same(draw(b, epoch), expected)
        assert_same(draw(b, epoch, workers=2), expected)
        assert_same(draw(b, epoch, start=6), expected[2:])  # resumed mid-epoch
    assert not torch.equal(draw(b, 0)[0]["waves"], draw(b, 1)[0]["waves"])

    # Two processes for two global batches, then one: every position once, each the sample it always is.
    reference = {int(i): w for batch in draw(a) for i, w in zip(batch["index"], batch["waves"])}
    seen = [batch for rank in range(2) for batch in draw(b, micro_batch=3, rank=rank, world=2)[:2]]
    seen += draw(b, start=12, micro_batch=3)
    assert sorted(int(i) for batch in seen for i in batch["index"]) == list(range(15))
    assert all(torch.equal(w, reference[int(i)]) for batch in seen for i, w in zip(batch["index"], batch["waves"]))

    # Mixed with a CSV dataset in one run: the same weights, namespaces and epoch as two CSVs.
    other = tone_corpus("other", speakers=2, utterances=4, seconds=0.4, seed=1)
    csvs = [{"name": "set", "csv": str(manifest), "shuffle": "blocks", "block_rows": 4, "weight": 0.7},
            {"name": "other", "csv": str(other), "weight": 0.3, "namespace": "pool"}]
    mixed = [{"name": "set", "shards": str(out), "weight": 0.7}, csvs[1]]
    a, b = build_training_data(make_config(csvs, **AUGMENTED)), build_training_data(make_config(mixed, **AUGMENTED))
    assert a.label_map == b.label_map and "pool/spk1" in b.label_map
    assert a.samples_per_epoch == b.samples_per_epoch
    assert_same(draw(b, micro_batch=2, workers=2), draw(a, micro_batch=2))
    assert sorted(set(b.datasets_at(0, range(b.samples_per_epoch)))) == ["other", "set"]


def rewrite_in_formats(manifest: Path) -> dict[str, str]:
    """The corpus's files rewritten in the formats a pack decodes in place or not: FLAC, Ogg Vorbis (libsndfile
    refuses to decode it embedded in another file), 24-bit stereo at 8 kHz, float, a WAV with a chunk after
    its data, and one whose sizes are unset (alone, libsndfile reads to the end of the file; inside a shard it
    would read on into the next file). Returns {CSV path: kind}."""
    rows = list(csv.DictReader(open(manifest)))
    kinds = ["flac", "ogg", "stereo8k", "float", "chunk_after_data", "sizes_unset"]
    for number, row in enumerate(rows):
        kind = kinds[number % len(kinds)]
        path = manifest.parent / row["path"]
        wave, rate = soundfile.read(path, dtype="float32")
        path.unlink()
        row["path"] = str(Path(row["path"]).with_suffix({"flac": ".flac", "ogg": ".ogg"}.get(kind, ".wav")))
        path = manifest.parent / row["path"]
        if kind in ("flac", "ogg"):
            soundfile.write(path, wave, rate, format=kind.upper(), subtype="PCM_16" if kind == "flac" else "VORBIS")
        elif kind == "stereo8k":
            soundfile.write(path, np.stack([wave[::2], -wave[::2]], axis=1), rate // 2, subtype="PCM_24")
        elif kind == "float":
            soundfile.write(path, wave, rate, subtype="FLOAT")
        else:
            soundfile.write(path, wave, rate, subtype="PCM_16")
            data = bytearray(path.read_bytes())
            if kind == "chunk_after_data":
                data += b"LIST" + (12).to_bytes(4, "little") + b"INFOISFT\x00\x00\x00\x00"
                data[4:8] = (len(data) - 8).to_bytes(4, "little")
            else:  # sizes unset, as a writer to a pipe leaves them: alone, the data runs to the end of the file
                at = data.index(b"data") + 4
                data[4:8] = data[at : at + 4] = b"\xff\xff\xff\xff"
            path.write_bytes(bytes(data))
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {row["path"]: kinds[number % len(kinds)] for number, row in enumerate(rows)}


def test_every_audio_format_gives_the_same_samples_decoded_in_place_or_from_bytes(tmp_path, tone_corpus):
    manifest = tone_corpus("set", speakers=3, utterances=6, seconds=0.6)
    kinds = rewrite_in_formats(manifest)
    out = tmp_path / "packed"
    pack_manifest(manifest, out, "60KB", 3)
    catalogue = pq.read_table(out / "rows.parquet").to_pylist()
    paths = [row["path"] for row in csv.DictReader(open(manifest))]
    in_place = {(kinds[paths[row["csv_row"] - 1]], row["in_place"]) for row in catalogue}
    assert in_place == {("flac", False), ("ogg", False), ("stereo8k", True), ("float", True),
                        ("chunk_after_data", True), ("sizes_unset", False)}
    csv_data = build_training_data(make_config([{"name": "set", "csv": str(manifest), "shuffle": "blocks",
                                                 "block_rows": 3}], **AUGMENTED))
    shard_data = build_training_data(make_config([{"name": "set", "shards": str(out)}], **AUGMENTED))
    for epoch in (0, 1):
        expected = draw(csv_data, epoch, micro_batch=6)
        assert not any(batch["bad"].any() for batch in expected)
        assert_same(draw(shard_data, epoch, micro_batch=6), expected)
        assert_same(draw(shard_data, epoch, micro_batch=6, workers=2), expected)


def test_block_shuffle_draws_from_many_shards_and_repeats_no_row_before_exhaustion(capsys):
    """1,000 shards of one speaker (10 rows each, one block per shard): the order function alone."""
    blocks = np.full(1000, 10)
    order = block_shuffled_rows(blocks, 25000, window=32, seed=3, epoch=0, dataset=0)
    for first in range(0, 20000, 10000):  # each pass over the 10,000 rows is a permutation
        assert np.array_equal(np.sort(order[first : first + 10000]), np.arange(10000))
    assert not np.array_equal(order[:10000], order[10000:20000])
    assert np.array_equal(order, block_shuffled_rows(blocks, 25000, window=32, seed=3, epoch=0, dataset=0))
    assert not np.array_equal(order, block_shuffled_rows(blocks, 25000, window=32, seed=3, epoch=1, dataset=0))
    shards_per_batch = [len(np.unique(order[i : i + 256] // 10)) for i in range(0, 10000 - 255, 256)]
    with capsys.disabled():
        print(f"\nblock shuffle, window 32: a batch of 256 draws from {np.mean(shards_per_batch):.1f} shards "
              f"(min {min(shards_per_batch)}) of 1,000")
    assert min(shards_per_batch) >= 25  # 32 blocks of 10 rows per window: a batch spans one or two windows
    wider = block_shuffled_rows(blocks, 10000, window=256, seed=3, epoch=0, dataset=0)
    assert np.mean([len(np.unique(wider[i : i + 256] // 10)) for i in range(0, 9984, 256)]) > 100


def test_reading_over_http_is_block_wise_with_the_same_samples(tmp_path, tone_corpus, http_server):
    manifest, out = packed(tone_corpus, tmp_path, speakers=4, utterances=6)  # 24 rows, 6 blocks
    local = build_training_data(make_config([{"name": "set", "shards": str(out)}], **AUGMENTED))
    remote = build_training_data(make_config([{"name": "set", "shards": f"{http_server.url}/{out.name}"}],
                                             **AUGMENTED))
    index = json.loads((out / "index.json").read_text())
    shard_files = {f"/{out.name}/{shard['file']}" for shard in index["shards"]}
    start_up = list(http_server.requests)
    assert [path for _, path, _ in start_up[:2]] == [f"/{out.name}/index.json", f"/{out.name}/rows.parquet"]
    assert sorted(path for _, path, _ in start_up[2:]) == sorted(2 * list(shard_files))  # each one's start, end
    http_server.requests.clear()

    expected = draw(local, micro_batch=4)
    assert_same(draw(remote, micro_batch=4), expected)
    reads = http_server.requests
    assert all(method == "GET" and path in shard_files and rng.startswith("bytes=") for method, path, rng in reads)
    assert len(reads) == 6  # each block read once with one request: none per utterance
    http_server.requests.clear()
    assert_same(draw(remote, micro_batch=4, workers=2), expected)
    assert len(http_server.requests) <= 2 * 6  # at most once per epoch per process

    # Memory below one block: blocks are evicted and read again, the samples stay the same.
    small = build_training_data(make_config([{"name": "set", "shards": f"{http_server.url}/{out.name}"}],
                                            **AUGMENTED, shard_memory_mb=0.01))
    http_server.requests.clear()
    assert_same(draw(small, micro_batch=4), expected)
    assert len(http_server.requests) > 6

    # A process resuming at position 20 reads only the blocks that positions 20-23 need.
    resumed = build_training_data(make_config([{"name": "set", "shards": f"{http_server.url}/{out.name}"}],
                                              **AUGMENTED))
    http_server.requests.clear()
    assert_same(draw(resumed, start=20, micro_batch=4), expected[5:])
    needed = {resumed._sources[0].manifest.block_of(row) for _, row in resumed.locate(0, range(20, 24))}
    assert len(http_server.requests) == len(needed) < 6


def test_a_shard_schema_longer_than_the_first_read_is_read_whole(tmp_path, tone_corpus, http_server, monkeypatch):
    _, out = packed(tone_corpus, tmp_path)
    monkeypatch.setattr(shards, "HEAD_BYTES", 16)  # a schema message is ~1 KB: it no longer fits
    for spec in (str(out), f"{http_server.url}/{out.name}"):
        data = build_training_data(make_config([{"name": "set", "shards": spec}]))
        assert not data._sources[0].manifest.unreadable and len(draw(data)) == 5


def test_a_forked_worker_leaves_the_parents_http_connections_working(tmp_path, tone_corpus, http_server):
    """A DataLoader worker opens its own file system; freeing the inherited one would close the parent's pooled
    connections on their event loop, which parent and child share across fork: the parent's next request on
    one of them would wait forever."""
    _, out = packed(tone_corpus, tmp_path)
    url = f"{http_server.url}/{out.name}"
    dataset = ShardDataset(url)  # start-up reads leave connections in the parent's pool
    child = os.fork()
    if child == 0:
        dataset.fs  # what a worker does first
        gc.collect()
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    opened = []
    reopen = threading.Thread(target=lambda: opened.append(ShardDataset(url)), daemon=True)
    reopen.start()
    reopen.join(30)
    assert opened and len(opened[0]) == 15, "the parent's next request hung"


def test_a_damaged_shard_met_in_training_is_skipped_counted_and_named(tmp_path, tone_corpus, caplog):
    manifest, out = packed(tone_corpus, tmp_path)
    index = json.loads((out / "index.json").read_text())
    victim = out / index["shards"][1]["file"]
    catalogue = pq.read_table(out / "rows.parquet").to_pylist()
    damaged = [row for row in catalogue if row["shard"] == 1][:2]  # two files' headers overwritten
    data = bytearray(victim.read_bytes())
    for row in damaged:
        data[row["offset"] : row["offset"] + 64] = b"\xff" * 64
    victim.write_bytes(bytes(data))
    stream = build_training_data(make_config([{"name": "set", "shards": str(out)}]))
    caplog.set_level(logging.WARNING, logger="ecapa_accel.data")
    batches = draw(stream)
    bad = torch.cat([b["bad"] for b in batches])
    damaged_rows = {catalogue.index(row) for row in damaged}
    assert bad.sum() >= 1 and bad.tolist() == [int(row in damaged_rows) for _, row in stream.locate(0, range(15))]
    assert any(victim.name in record.getMessage() and "unreadable audio" in record.getMessage()
               for record in caplog.records)
    assert all(torch.isfinite(b["waves"]).all() and b["waves"].abs().amax(1).gt(0).all() for b in batches)

    # A truncated shard is seen at start-up: its rows count as unreadable files, within data.max_bad_fraction.
    last = out / index["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"cannot be decoded \(e.g. {last.name} \(CSV row \d+\)\).*max_bad_fraction"):
        build_training_data(make_config([{"name": "set", "shards": str(out)}], max_bad_fraction=0.01))
    assert build_training_data(make_config([{"name": "set", "shards": str(out)}],
                                           max_bad_fraction=0.5)).samples_per_epoch == 15


def test_bad_shard_inputs_exit_2_naming_them_before_the_run_dir_is_written(tmp_path, tone_corpus, capsys,
                                                                            http_server):
    manifest, out = packed(tone_corpus, tmp_path)
    config = tmp_path / "config.yaml"
    run = tmp_path / "run"

    def refused(shards: str, expected: str, **dataset) -> None:
        config.write_text(yaml.safe_dump({"data": {"datasets": [{"name": "set", "shards": shards, **dataset}],
                                                   "crop_seconds": 0.25, "num_workers": 0},
                                          "model": {"channels": 16, "embed_dim": 16}, "features": {"n_mels": 24},
                                          "train": {"batch_size": 4, "max_steps": 1}}))
        code, _, err = run_cli(capsys, "train", str(config), "--run-dir", str(run))
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
        assert not run.exists()

    refused(str(tmp_path / "nowhere"), "nowhere: no such folder")
    refused(str(manifest.parent), f"no index.json at {manifest.parent}/index.json")
    refused(f"{http_server.url}/missing", f"{http_server.url}/missing: no index.json")
    refused(str(out / "shard-9*.arrow"), "no shard of")
    refused(str(out), "shuffle' must be blocks", shuffle="rows")
    refused(str(out), "packed in blocks of 4 rows", block_rows=8)

    broken = shutil.copytree(out, tmp_path / "broken")
    (broken / "shard-00001.arrow").unlink()
    refused(str(broken), "lists shard-00001.arrow, which is missing")
    refused(f"{http_server.url}/broken", "lists shard-00001.arrow, which is missing")

    older = shutil.copytree(out, tmp_path / "older")
    table = pa.ipc.open_stream((older / "shard-00000.arrow").read_bytes()).read_all()
    metadata = json.loads(table.schema.metadata[b"ecapa_accel.pack"])
    schema = table.schema.with_metadata({b"ecapa_accel.pack": json.dumps({**metadata, "version": 0})})
    with pa.ipc.new_stream(str(older / "shard-00000.arrow"), schema) as writer:
        writer.write_table(table.replace_schema_metadata(schema.metadata))
    index = json.loads((older / "index.json").read_text())
    index["shards"][0]["bytes"] = (older / "shard-00000.arrow").stat().st_size
    (older / "index.json").write_text(json.dumps(index))
    refused(str(older), "shard-00000.arrow: shard of pack format version 0")
    index["version"] = 1  # a pack of the Parquet shards of the first release
    (older / "index.json").write_text(json.dumps(index))
    refused(str(older / "index.json"), "pack format version 1, this ecapa-accel reads version 2")

    config.write_text(yaml.safe_dump({"data": {"datasets": [{"name": "set", "shards": str(out),
                                                             "csv": str(manifest)}]}}))
    code, _, err = run_cli(capsys, "train", str(config), "--run-dir", str(run))
    assert code == 2 and "data.datasets[0].shards' and .csv are both given" in err


def shard_run_config(tmp_path: Path, tone_corpus, shards: str, **train) -> Path:
    """A tiny training run reading one packed dataset and one CSV."""
    other = tone_corpus("beta", speakers=3, utterances=4, seconds=1.0, seed=1)
    config = {
        "data": {"datasets": [{"name": "alpha", "shards": shards, "weight": 0.5},
                              {"name": "beta", "csv": str(other), "weight": 0.5}],
                 "crop_seconds": 0.5, "num_workers": 0},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 16},
        "optim": {"lr": 0.05},
        "train": {"batch_size": 4, "max_steps": 6, "epochs": 100, "checkpoint_every_steps": 2,
                  "checkpoint_every_minutes": 0, "log_every_steps": 1, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_training_from_shards_over_http_through_the_cli(tmp_path, tone_corpus, http_server):
    _, out = packed(tone_corpus, tmp_path, name="alpha", speakers=3, utterances=4, seconds=1.0,
                    shard_size="64KB")
    config = shard_run_config(tmp_path, tone_corpus, f"{http_server.url}/{out.name}", max_steps=4)
    result = cli("train", str(config), "--run-dir", str(tmp_path / "run"), "data.num_workers=2")
    assert result.returncode == 0, result.stderr
    status = json.loads(cli("status", str(tmp_path / "run"), "--json").stdout)
    assert status["finished"] and status["step"] == 4
    shard_reads = [rng for method, path, rng in http_server.requests if path.endswith(".arrow")]
    assert shard_reads and all(rng.startswith("bytes=") for rng in shard_reads)


@pytest.mark.slow
def test_sigkill_then_resume_from_shards_is_bit_identical(tmp_path, tone_corpus):
    import signal

    _, out = packed(tone_corpus, tmp_path, name="alpha", speakers=3, utterances=4, seconds=1.0,
                    shard_size="64KB")
    config = shard_run_config(tmp_path, tone_corpus, str(out))
    reference = tmp_path / "reference"
    assert cli("train", str(config), "--run-dir", str(reference)).returncode == 0

    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "ecapa_accel.cli", "train", str(config), "--run-dir", str(run),
                                "data.num_workers=2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_2").is_dir():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = cli("resume", str(run), "data.num_workers=1")
    assert result.returncode == 0, result.stderr
    a = load_file(str(reference / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
