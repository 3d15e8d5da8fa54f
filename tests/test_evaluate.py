"""Scoring metrics, AS-norm and `ecapa-accel eval` on generated audio with a tiny model."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import soundfile
import torch

from conftest import run_cli

from ecapa_accel.config import EvalConfig, FeaturesConfig
from ecapa_accel.encoder import EcapaEncoder
from ecapa_accel.errors import UserError
from ecapa_accel.evaluate import (
    as_norm,
    audio_item,
    cohort_top_k_stats,
    compute_eer,
    compute_eer_threshold,
    compute_min_dcf,
    embed_items,
    validate,
)
from ecapa_accel.model import EcapaTdnn


# ---- metrics against a brute-force sweep


def brute_force_rates(scores, labels):
    """(threshold, miss, false alarm) for every distinct score and +inf, by direct counting."""
    targets = [s for s, l in zip(scores, labels) if l == 1]
    nontargets = [s for s, l in zip(scores, labels) if l == 0]
    rows = []
    for threshold in sorted(set(scores)) + [math.inf]:
        miss = sum(s < threshold for s in targets) / len(targets)
        false_alarm = sum(s >= threshold for s in nontargets) / len(nontargets)
        rows.append((threshold, miss, false_alarm))
    return rows


def brute_force_eer(scores, labels):
    rows = brute_force_rates(scores, labels)
    for (_, miss_a, fa_a), (_, miss_b, fa_b) in zip(rows, rows[1:]):
        if miss_b >= fa_b:  # the first threshold where misses catch up with false alarms
            weight = (fa_a - miss_a) / ((fa_a - miss_a) - (fa_b - miss_b))
            return 100 * (miss_a + weight * (miss_b - miss_a))
    raise AssertionError("the curves always cross")


def brute_force_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    costs = [c_miss * p_target * miss + c_fa * (1 - p_target) * fa for _, miss, fa in brute_force_rates(scores, labels)]
    return min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_sweep_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    labels[:2] = [1, 0]
    scores = rng.normal(size=n) + 1.5 * labels
    if seed % 2:
        scores = np.round(scores, 1)  # many ties, also between targets and non-targets
    scores, labels = scores.tolist(), labels.tolist()

    assert compute_eer(scores, labels) == pytest.approx(brute_force_eer(scores, labels), abs=1e-9)
    for p_target in (0.01, 0.05, 0.5):
        assert compute_min_dcf(scores, labels, p_target) == pytest.approx(
            brute_force_min_dcf(scores, labels, p_target), abs=1e-9)
    assert compute_min_dcf(scores, labels, 0.05, c_miss=10, c_fa=1) == pytest.approx(
        brute_force_min_dcf(scores, labels, 0.05, 10, 1), abs=1e-9)
    # The EER threshold is where the two rates are closest among all finite thresholds.
    gaps = {t: abs(fa - miss) for t, miss, fa in brute_force_rates(scores, labels) if math.isfinite(t)}
    threshold = compute_eer_threshold(scores, labels)
    assert threshold in gaps and gaps[threshold] == pytest.approx(min(gaps.values()))


@pytest.mark.parametrize(
    "scores, labels, eer, min_dcf_at_half",
    [
        ([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0], 0.0, 0.0),  # separated
        ([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], 50.0, 1.0),  # all scores equal
        ([0.6, 0.1, 0.5, 0.7, 0.9], [1, 0, 0, 0, 0], 50.0, 0.5),  # a single target
        ([0.5, 0.7, 0.5, 0.3], [1, 1, 0, 0], 25.0, 0.5),  # a tie between a target and a non-target
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 100.0, 1.0),  # inverted
    ],
)
def test_metrics_on_hand_made_cases(scores, labels, eer, min_dcf_at_half):
    assert compute_eer(scores, labels) == pytest.approx(eer)
    assert compute_min_dcf(scores, labels, p_target=0.5) == pytest.approx(min_dcf_at_half)
    # Rejecting every trial costs exactly the normalisation, so minDCF never exceeds 1.
    assert compute_min_dcf(scores, labels) <= 1.0


def test_metrics_accept_lists_arrays_and_tensors_and_reject_one_class():
    scores = [0.3, 0.9, 0.4, 0.2, 0.8]
    labels = [0, 1, 1, 0, 0]
    expected = compute_eer(scores, labels)
    assert expected == pytest.approx(100 / 3)  # crossing between thresholds 0.4 (miss 0, FA 1/3) and 0.8 (1/2, 1/3)
    assert compute_eer(np.array(scores), np.array(labels, dtype=bool)) == expected
    assert compute_eer(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)
    assert compute_eer_threshold(scores, labels) == 0.8
    with pytest.raises(UserError, match="0 non-target"):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        compute_min_dcf([0.1, 0.2], [1, 2])


# ---- AS-norm


def test_as_norm_on_hand_computed_cohort():
    cohort = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosines vs cohort: [1, 0, -1] and [0, 1, 0]
    mean, std = cohort_top_k_stats(embeddings, cohort, top_k=2)
    assert mean.tolist() == pytest.approx([0.5, 0.5])
    assert std.tolist() == pytest.approx([0.5, 0.5])
    score = torch.tensor([0.0])  # cos of the two embeddings
    normalised = as_norm(score, (mean[:1], std[:1]), (mean[1:], std[1:]))
    assert normalised.tolist() == pytest.approx([-1.0])
    # top_k larger than the cohort uses the whole cohort.
    mean_all, _ = cohort_top_k_stats(embeddings, cohort, top_k=50)
    assert mean_all.tolist() == pytest.approx([0.0, 1 / 3])


def test_as_norm_removes_utterance_dependent_score_offsets():
    """Utterances that score high against everyone (a shared 'channel' direction) inflate non-target scores;
    AS-norm subtracts each side's cohort level and lowers the EER."""
    gen = torch.Generator().manual_seed(0)
    dim, speakers, per_speaker = 24, 30, 4
    channel = torch.randn(dim, generator=gen)

    def utterances(count):
        identity = torch.randn(count, dim, generator=gen).repeat_interleave(per_speaker, 0)
        strength = 3 * torch.rand(count * per_speaker, 1, generator=gen)
        return identity + 0.7 * torch.randn(count * per_speaker, dim, generator=gen) + strength * channel

    test = torch.nn.functional.normalize(utterances(speakers), dim=1)
    cohort = utterances(40)
    speaker = torch.arange(speakers).repeat_interleave(per_speaker)
    enroll_idx, test_idx = torch.triu_indices(len(test), len(test), offset=1)
    labels = (speaker[enroll_idx] == speaker[test_idx]).int()
    raw = (test[enroll_idx] * test[test_idx]).sum(1)
    mean, std = cohort_top_k_stats(test, cohort, top_k=40)
    normalised = as_norm(raw, (mean[enroll_idx], std[enroll_idx]), (mean[test_idx], std[test_idx]))

    raw_eer, norm_eer = compute_eer(raw, labels), compute_eer(normalised, labels)
    assert norm_eer < 0.6 * raw_eer, (raw_eer, norm_eer)


# ---- `ecapa-accel eval` and the training-time hook, end to end with a tiny model


@pytest.fixture
def export_dir(tmp_path):
    torch.manual_seed(0)
    return EcapaEncoder(EcapaTdnn(n_mels=80, channels=16, embed_dim=8), FeaturesConfig()).save_pretrained(
        tmp_path / "export")


@pytest.fixture
def corpus(tone_corpus):
    """A tone corpus plus an exact copy of one file (equal lengths share a batch) and a stereo 8 kHz file."""
    manifest = tone_corpus("test", speakers=3, utterances=3)
    folder = manifest.parent
    shutil.copy(folder / "spk0/utt0.wav", folder / "spk0/copy.wav")
    wave, rate = soundfile.read(folder / "spk1/utt1.wav")
    soundfile.write(folder / "spk1/stereo8k.wav", np.stack([wave[::2], 0.5 * wave[::2]], axis=1), rate // 2)
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("test-spk0-copy,spk0/copy.wav,spk0,1.0\ntest-spk1-stereo,spk1/stereo8k.wav,spk1,1.0\n")
    return manifest


def manifest_rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_trials(manifest, kaldi=False):
    """Every pair of the manifest's files, VoxCeleb style ('1 a.wav b.wav') or Kaldi style (IDs, target)."""
    rows = manifest_rows(manifest)
    lines = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            same = a["spk"] == b["spk"]
            if kaldi:
                lines.append(f"{a['ID']} {b['ID']} {'target' if same else 'nontarget'}")
            else:
                lines.append(f"{int(same)} {a['path']} {b['path']}")
    trials = manifest.parent / ("trials_kaldi.txt" if kaldi else "trials.txt")
    trials.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return trials


def test_eval_scores_equal_cosines_of_embed_file(capsys, export_dir, corpus):
    trials = write_trials(corpus)
    scores_file = corpus.parent / "scores.txt"
    code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", trials, "--scores", scores_file, "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"eer", "min_dcf", "trials", "threshold"}
    assert report["trials"] == 55  # 11 files, every pair

    encoder = EcapaEncoder.from_pretrained(export_dir)
    embeddings = {row["path"]: encoder.embed_file(corpus.parent / row["path"]) for row in manifest_rows(corpus)}
    lines = [line.split() for line in scores_file.read_text().splitlines()]
    assert len(lines) == 55
    for enroll, test, score, label in lines:
        expected = torch.cosine_similarity(embeddings[enroll], embeddings[test], dim=0)
        assert float(score) == pytest.approx(expected.item(), abs=1e-5)
    scores = [float(line[2]) for line in lines]
    labels = [int(line[3]) for line in lines]
    assert report["eer"] == pytest.approx(compute_eer(scores, labels), abs=1e-3)

    # The same trials in Kaldi format, utterance IDs mapped to files by the manifest, from another folder.
    code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", write_trials(corpus, kaldi=True), "--manifest",
                           corpus, "--json")
    assert code == 0
    assert json.loads(out) == pytest.approx(report)


def test_eval_with_cohort_reports_raw_and_asnorm(capsys, export_dir, corpus, tone_corpus):
    cohort = tone_corpus("cohort", speakers=5, utterances=2, seed=1)
    scores_file = corpus.parent / "scores.txt"
    code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", write_trials(corpus), "--cohort", cohort,
                           "--top-k", 3, "--scores", scores_file, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["trials"] == 55
    assert report["asnorm"]["cohort_size"] == 5  # one member per cohort speaker
    assert report["asnorm"]["top_k"] == 3
    columns = [line.split() for line in scores_file.read_text().splitlines()]
    labels = [int(c[4]) for c in columns]
    assert report["eer"] == pytest.approx(compute_eer([float(c[2]) for c in columns], labels), abs=1e-3)
    assert report["asnorm"]["eer"] == pytest.approx(compute_eer([float(c[3]) for c in columns], labels), abs=1e-3)
    assert [float(c[2]) for c in columns] != pytest.approx([float(c[3]) for c in columns])


def test_long_files_are_embedded_in_chunks_like_embed_file(export_dir, corpus):
    encoder = EcapaEncoder.from_pretrained(export_dir)
    paths = [corpus.parent / row["path"] for row in manifest_rows(corpus)]
    embeddings = embed_items(encoder, [audio_item(path, "test") for path in paths], max_chunk_seconds=0.4)
    for path, embedding in zip(paths, embeddings):
        assert torch.allclose(embedding, encoder.embed_file(path, max_chunk_seconds=0.4), atol=1e-5)


def test_validate_writes_score_label_lines(tmp_path, corpus):
    encoder = EcapaEncoder(EcapaTdnn(n_mels=80, channels=16, embed_dim=8), FeaturesConfig()).eval()
    scores_file = tmp_path / "step_10.txt"
    result = validate(encoder, EvalConfig(trials=str(write_trials(corpus))), scores_file)
    assert set(result) == {"eer", "min_dcf", "threshold", "trials"}
    assert result["trials"] == 55
    pairs = [line.split() for line in scores_file.read_text().splitlines()]
    assert len(pairs) == 55 and all(len(pair) == 2 for pair in pairs)
    scores, labels = [float(p[0]) for p in pairs], [int(p[1]) for p in pairs]
    assert sum(labels) == 6 + 6 + 3  # same-speaker pairs: spk0 and spk1 have 4 files (copy, stereo), spk2 has 3
    assert result["eer"] == pytest.approx(compute_eer(scores, labels), abs=1e-3)
    assert result["min_dcf"] == pytest.approx(compute_min_dcf(scores, labels), abs=1e-3)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_trials", r"nothere\.txt: trials file not found"),
        ("missing_wav", r"trials\.txt line 2: audio file not found: .*ghost\.wav"),
        ("malformed", r"trials\.txt line 3: expected '1 a\.wav b\.wav' like the lines above"),
        ("not_audio", r"trials\.txt line 1: .*notes\.wav is not a readable audio file"),
        ("empty_cohort", r"empty\.csv: no rows after the header"),
        ("kaldi_without_manifest", r"audio file not found: .*test-spk0-0 \(Kaldi-style IDs: pass a manifest"),
        ("unknown_id", r"trials\.txt line 1: utterance 'nobody' is not in manifest .*train\.csv"),
        ("one_speaker_cohort", r"one\.csv: AS-norm needs at least 2 cohort speakers or files, got 1"),
    ],
)
def test_eval_bad_inputs_exit_2_with_one_line(capsys, export_dir, corpus, case, message):
    folder = corpus.parent
    trials = folder / "trials.txt"
    good = "1 spk0/utt0.wav spk0/utt1.wav\n0 spk0/utt0.wav spk1/utt0.wav\n"
    extra = []
    if case == "missing_trials":
        trials = folder / "nothere.txt"
    elif case == "missing_wav":
        trials.write_text("1 spk0/utt0.wav spk0/utt1.wav\n0 spk0/utt0.wav spk1/ghost.wav\n")
    elif case == "malformed":
        trials.write_text(good + "1 spk0/utt0.wav\n")
    elif case == "not_audio":
        (folder / "notes.wav").write_text("this is not audio\n")
        trials.write_text("1 notes.wav spk0/utt1.wav\n" + good)
    elif case == "empty_cohort":
        trials.write_text(good)
        (folder / "empty.csv").write_text("ID,path,spk\n")
        extra = ["--cohort", folder / "empty.csv"]
    elif case == "kaldi_without_manifest":
        trials = write_trials(corpus, kaldi=True)
    elif case == "unknown_id":
        trials.write_text("nobody test-spk0-1 target\n")
        extra = ["--manifest", corpus]
    elif case == "one_speaker_cohort":
        trials.write_text(good)
        (folder / "one.csv").write_text("path,spk\nspk0/utt0.wav,a\nspk0/utt1.wav,a\n")
        extra = ["--cohort", folder / "one.csv"]
    code, out, err = run_cli(capsys, "eval", export_dir, "--trials", trials, *extra)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


# ---- several trials files, several p_target values, verify


def assert_same_report(got: dict, expected: dict) -> None:
    """Equal keys (nested too); numbers equal up to float noise of a different batching."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_report(got[key], value)
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_several_trials_files_report_what_separate_evals_report(capsys, export_dir, corpus, tone_corpus):
    everything = write_trials(corpus).read_text().splitlines()
    first, second = corpus.parent / "first.txt", corpus.parent / "second.txt"
    first.write_text("\n".join(everything[:30]) + "\n")
    second.write_text("\n".join(everything[20:]) + "\n")  # overlapping utterances: embedded once for both
    cohort = tone_corpus("cohort", speakers=4, utterances=2, seed=1)
    common = ["--cohort", cohort, "--top-k", 3, "--json"]

    code, out, err = run_cli(capsys, "eval", export_dir, "--trials", first, "--trials", second,
                             "--scores", corpus.parent / "both_1.txt", "--scores", corpus.parent / "both_2.txt", *common)
    assert code == 0, err
    together = json.loads(out)
    assert isinstance(together, list) and [r["trials_file"] for r in together] == [str(first), str(second)]
    for report, trials, scores in zip(together, (first, second), ("both_1.txt", "both_2.txt")):
        code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", trials, "--scores",
                               corpus.parent / "alone.txt", *common)
        alone = json.loads(out)
        assert "trials_file" not in alone  # one trials file: one object, as before
        assert_same_report({k: v for k, v in report.items() if k != "trials_file"}, alone)
        together_lines = [line.split() for line in (corpus.parent / scores).read_text().splitlines()]
        alone_lines = [line.split() for line in (corpus.parent / "alone.txt").read_text().splitlines()]
        assert [line[:2] + line[-1:] for line in together_lines] == [line[:2] + line[-1:] for line in alone_lines]
        for a, b in zip(together_lines, alone_lines):  # cosine, then AS-norm (which magnifies float noise)
            assert float(a[2]) == pytest.approx(float(b[2]), abs=2e-6)
            assert float(a[3]) == pytest.approx(float(b[3]), rel=1e-3)


def test_p_target_is_repeatable_and_min_dcf_is_at_the_first(capsys, export_dir, corpus):
    trials, scores_file = write_trials(corpus), corpus.parent / "scores.txt"
    code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", trials, "--scores", scores_file,
                           "--p-target", 0.05, "--p-target", 0.001, "--p-target", 0.5, "--json")
    assert code == 0
    report = json.loads(out)
    lines = [line.split() for line in scores_file.read_text().splitlines()]
    scores, labels = [float(line[2]) for line in lines], [int(line[3]) for line in lines]
    assert set(report["min_dcf_at"]) == {"0.05", "0.001", "0.5"}
    for p in (0.05, 0.001, 0.5):
        assert report["min_dcf_at"][f"{p:g}"] == pytest.approx(brute_force_min_dcf(scores, labels, p), abs=1e-9)
    assert report["min_dcf"] == report["min_dcf_at"]["0.05"]
    assert report["min_dcf_at"]["0.5"] != pytest.approx(report["min_dcf_at"]["0.001"])

    code, out, _ = run_cli(capsys, "eval", export_dir, "--trials", trials)  # the text report names each p_target
    assert code == 0 and "minDCF " in out and "minDCF(" not in out
    code, out, err = run_cli(capsys, "eval", export_dir, "--trials", trials, "--p-target", 1.5)
    assert code == 2 and out == "" and "--p-target must be within (0, 1), got 1.5" in err


def test_verify_prints_the_cosine_and_decides_with_a_calibrated_threshold(capsys, export_dir, corpus):
    a, b = corpus.parent / "spk0/utt0.wav", corpus.parent / "spk1/utt1.wav"
    encoder = EcapaEncoder.from_pretrained(export_dir)
    expected = torch.cosine_similarity(encoder.embed_file(a), encoder.embed_file(b), dim=0).item()
    code, out, _ = run_cli(capsys, "verify", export_dir, a, b)
    assert code == 0
    assert float(out) == pytest.approx(expected, abs=1e-5) and len(out.split()) == 1  # no threshold: score only

    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text())
    for threshold, decision in ((expected - 0.01, "same"), (expected + 0.01, "different")):
        config_path.write_text(json.dumps({**config, "threshold": threshold}))
        code, out, _ = run_cli(capsys, "verify", export_dir, a, b)
        assert code == 0 and out.split()[1] == decision
        code, out, _ = run_cli(capsys, "verify", export_dir, a, b, "--json")
        assert json.loads(out) == pytest.approx({"score": expected, "threshold": threshold,
                                                 "same": decision == "same"}, abs=1e-5)

    code, out, err = run_cli(capsys, "verify", export_dir, a, corpus.parent / "nobody.wav")
    assert code == 2 and out == "" and "nobody.wav" in err and len(err.strip().splitlines()) == 1


def test_eval_cohort_rows_are_numbered_as_data_check_numbers_them(capsys, export_dir, corpus):
    cohort = corpus.parent / "cohort.csv"
    cohort.write_text("ID,path,spk\nc1,spk0/utt0.wav,a\nc2,spk0/ghost.wav,b\nc3,spk1/utt0.wav,c\n")
    code, _, check_err = run_cli(capsys, "data", "check", cohort)
    assert code == 2
    code, _, eval_err = run_cli(capsys, "eval", export_dir, "--trials", write_trials(corpus), "--cohort", cohort)
    assert code == 2
    assert "row 2 (ID c2)" in check_err and "ghost.wav" in check_err
    assert eval_err == check_err  # one reader, one message
