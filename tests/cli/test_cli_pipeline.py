"""The CLI contract: flags, JSON keys, exit status 2 with one sentence on user errors."""

from __future__ import annotations

import json

import pytest
import torch

from oscar_kv.cli import main

KEYS = {"method", "ppl", "nll", "kl", "top1_agree", "copy_acc", "bpe"}


@pytest.fixture(scope="module")
def pipeline_run(tiny_lm_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    rc = main(["pipeline", "--model", str(tiny_lm_dir),
               "--data", str(tiny_lm_dir / "heldout_tokens.npy"), "--max-tokens", "1280",
               "--seq-len", "320", "--holdout-seqs", "1", "--no-softmax-stats",
               "--recall-probes", "2",
               "--eval-seq-len", "320", "--num-seqs", "1", "--methods", "bf16,naive,oscar",
               "--sink-tokens", "16", "--recent-tokens", "32", "--work", str(work)])
    return rc, work


@pytest.mark.model
def test_pipeline_writes_contract_json(pipeline_run):
    rc, work = pipeline_run
    assert rc == 0
    out = json.loads((work / "eval.json").read_text())
    assert [r["method"] for r in out["results"]] == ["bf16", "naive", "oscar"]
    for r in out["results"]:
        assert KEYS <= set(r)
    bf16, naive, oscar = out["results"]
    assert bf16["kl"] == 0.0 and naive["kl"] > 0 and oscar["kl"] > 0
    # the quantized methods really differ from BF16 and report their storage cost
    assert naive["ppl"] != bf16["ppl"] and naive["bpe"] < 16
    report = json.loads((work / "rotations" / "fit_report.json").read_text())
    assert report["clip_source"] == "model_kl"
    sel = report["clip_selection"]
    assert min(sel["k_curve"].values()) == sel["k_curve"][str(sel["clip_k"])]
    assert out["config"]["clip_k"] == [sel["clip_k"]] * 6


@pytest.mark.model
def test_eval_rejects_rotations_of_another_model(pipeline_run, tiny_lm_dir, tmp_path, capsys):
    from oscar_kv.config import ModelGeometry
    from oscar_kv.fit.checkpoint import build_checkpoint, write_files_atomic

    _, work = pipeline_run
    bad = tmp_path / "rot"
    eye = torch.eye(128).expand(4, 128, 128).contiguous()
    ck = build_checkpoint(eye, torch.ones(4, 128), "identity")
    write_files_atomic(bad, {"k_rotation_identity.pt": ck, "v_rotation_identity.pt": ck})
    assert ModelGeometry(6, 8, 2, 128).num_layers == 6
    rc = main(["eval", "--model", str(tiny_lm_dir), "--rotations", str(bad),
               "--data", str(tiny_lm_dir / "heldout_tokens.npy"), "--seq-len", "320",
               "--num-seqs", "1", "--methods", "oscar", "--no-copy"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("oscar-kv: error: ")
    assert "4 layers" in last and "6 layers" in last


def test_missing_data_file_exits_2(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "none.npy"),
               "--methods", "bf16"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err


def test_group_size_must_divide_head_dim(tmp_path, capsys):
    rc = main(["fit", "--stats", str(tmp_path), "--out", str(tmp_path / "r"),
               "--group-size", "0"])
    assert rc == 2 and "group size" in capsys.readouterr().err


def test_unknown_method_lists_valid_ones(tiny_lm_dir, capsys):
    rc = main(["eval", "--model", str(tiny_lm_dir),
               "--data", str(tiny_lm_dir / "heldout_tokens.npy"), "--methods", "bf16,int3"])
    err = capsys.readouterr().err
    assert rc == 2 and "int3" in err and "oscar" in err


def test_missing_stats_dir_says_what_to_run(tmp_path, capsys):
    rc = main(["fit", "--stats", str(tmp_path / "nostats"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "calibrate" in err
    assert not (tmp_path / "r").exists()
