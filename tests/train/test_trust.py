"""Training commands a user can trust: one regression test per hole a new user fell into
(wrong results, silent loss of work, late failures, misleading messages). Each test runs the
real command on tiny data (the 2M-parameter ``bit_tiny`` at 32x32). The preemption tests
(SIGTERM, torchrun restarts) are in test_preemption.py; 16-bit images in tests/data."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bitfast import cli
from bitfast.train import checkpoint as ckpt

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--no-progress", "--no-plots",
        "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def run(capsys, *argv):
    """``bitfast ARGV`` in process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A finished 6-step fine-tuning run on digits 0-4 (its last.pt and output folder)."""
    out = tmp_path_factory.mktemp("up") / "run"
    assert cli.main(["finetune", *TINY, "--classes", "0", "1", "2", "3", "4", "--steps", "6", "--base-lr", "0.3",
                     "--output", str(out)]) == 0
    return out


def _images(root, classes, sizes, seed=0):
    """An ImageFolder: ``root/<class>/<i>.png`` with one image per size (h, w)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i:03d}.png")
    return root


# 1. The NaN stop saves finite weights and names the step they are from.
def test_nan_stop_saves_finite_weights_and_names_their_step(tmp_path, capsys):
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "5", "6", "7", "--steps", "20", "--base-lr", "1e8",
                       "--output", tmp_path)
    assert code == 3, err
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    step = state["step"]
    assert f"the last good state (after step {step}, all finite)" in err
    assert "step" in err and str(step + 1) in err
    tensors = [v for v in state["model"].values() if v.is_floating_point()]
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    # It resumes at a lower rate... as a fresh run from its weights, and trains finitely.
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "5", "6", "7", "--steps", "2", "--base-lr", "0.01",
                       "--pretrained", tmp_path / "last.pt", "--output", tmp_path / "again")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "again" / "metrics.jsonl") if '"train"' in line]
    assert all(math.isfinite(v) for v in losses)


# 2. --base-lr 0 is 0 (not the default), in both recipes.
def test_base_lr_zero_is_honoured(tmp_path, capsys):
    code, out, _ = run(capsys, "finetune", *TINY, "--classes", "5", "6", "--steps", "3", "--base-lr", "0",
                       "--output", tmp_path / "ft")
    assert code == 0 and "lr 0 (0 x 8/512)" in out
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "ft" / "metrics.jsonl") if '"train"' in line]
    assert lrs == [0.0, 0.0, 0.0]
    code, out, _ = run(capsys, "pretrain", *TINY, "--classes", "5", "6", "--epochs", "2", "--steps-per-epoch", "1",
                       "--base-lr", "0", "--output", tmp_path / "pre")
    assert code == 0 and "lr 0 (0 x 8/256)" in out
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "pre" / "metrics.jsonl") if '"train"' in line]
    assert lrs == [0.0, 0.0]


# 3. The HyperRule resolution is decided on the dataset, not on its first file.
def test_resolution_decided_on_the_dataset(tmp_path, capsys):
    from bitfast.train import hyperrule

    # The first sorted file is large; 7 of 9 images are below 96x96.
    sizes = [(147, 79), (150, 150)] + [(40, 40)] * 7
    data = _images(tmp_path / "data", ["a", "b"], sizes)
    assert hyperrule.dataset_image_size([(147, 79), (150, 150)] + [(40, 40)] * 7) == ((40, 40), 7 / 9)
    code, out, err = run(capsys, "finetune", "--model", "bit_tiny", "--batch-size", "4", "--steps", "1",
                         "--no-progress", "--no-plots", "--data", data, "--val-data", data, "--output", tmp_path / "o")
    assert code == 0, err
    assert "resize 160, crop 128" in out and "median image area of 18 training images: 40x40 (78% below 96x96)" in out


# 4. --resume refuses another run's checkpoint before training, naming what differs.
def test_resume_refuses_other_classes_and_norm(upstream, tmp_path, capsys):
    ck = upstream / "last.pt"
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "5", "6", "7", "8", "9", "--steps", "6",
                       "--base-lr", "0.3", "--resume", ck, "--output", tmp_path / "a")
    assert code == 2 and "its classes: ['0', '1', '2', '3', '4'], this run's: ['5', '6', '7', '8', '9']" in err
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "2", "3", "4", "--steps", "6",
                       "--base-lr", "0.3", "--norm", "bn", "--resume", ck, "--output", tmp_path / "b")
    assert code == 2 and "its norm: 'gn', this run's: 'bn' (--norm)" in err and "Traceback" not in err
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "2", "3", "4", "--steps", "300",
                       "--resume", ck, "--output", tmp_path / "c")
    assert code == 2 and "its total steps: 6, this run's: 300" in err
    assert not (tmp_path / "a" / "last.pt").exists() and not (tmp_path / "c" / "metrics.jsonl").exists()


# 5. An output that holds a run is never silently replaced; resumed metrics have each step once.
def test_output_with_a_run_is_refused_unless_resume_or_overwrite(upstream, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(upstream, out)
    before = (out / "last.pt").read_bytes()
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "3", "--output", out)
    assert code == 2 and "holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert (out / "last.pt").read_bytes() == before
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "3", "--overwrite", "--output", out)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 3] and ckpt.load_checkpoint(out / "last.pt")["step"] == 3  # 3 train + final eval


def test_resumed_metrics_hold_every_step_once_and_auto_says_when_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["finetune", *TINY, "--classes", "0", "1", "--steps", "6", "--checkpoint-every", "2", "--output", out]
    code, _, err = run(capsys, *common, "--resume", "auto")
    assert code == 0 and "--resume auto: no checkpoint in" in err and "starting a fresh run" in err
    # Cut a finished run back to its step-2 state as if it had died after step 4's records.
    assert run(capsys, *common, "--overwrite", "--stop-at-step", "2")[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 1.0}) + "\n")
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 1.0}) + "\n")
    code, _, err = run(capsys, *common, "--resume", "auto")
    assert code == 0 and "resumed from" in err
    steps = [(r["kind"], r["step"]) for r in map(json.loads, open(out / "metrics.jsonl"))]
    train = [s for k, s in steps if k == "train"]
    assert train == [1, 2, 3, 4, 5, 6]


# 7. Schedules that cannot work are refused, naming the flags; the default warm-up scales.
def test_schedules_refused_or_scaled_consistently(tmp_path, capsys):
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "20", "--warmup-steps", "15",
                       "--output", tmp_path / "a")
    assert code == 2 and "--warmup-steps 15 would end after the schedule's first decay (step 8" in err
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "20", "--warmup-steps", "20",
                       "--output", tmp_path / "b")
    assert code == 2 and "--warmup-steps 20 must be shorter than the run (20 steps)" in err
    code, _, err = run(capsys, "pretrain", *TINY, "--classes", "0", "1", "--epochs", "3", "--steps-per-epoch", "2",
                       "--warmup-steps", "6", "--output", tmp_path / "c")
    assert code == 2 and "--warmup-steps 6 must be shorter than the run (6 steps" in err
    # The recipe's 5000-step warm-up in a 30-step run: scaled to 10% (3 steps), the peak is reached.
    code, out, err = run(capsys, "pretrain", *TINY, "--classes", "0", "1", "--epochs", "3", "--steps-per-epoch", "10",
                         "--base-lr", "0.1", "--lr-schedule", "step", "--output", tmp_path / "d")
    assert code == 0, err
    assert "warm-up 3 steps (the recipe's 5000, scaled to 10% of this 30-step run" in out
    assert "/10 at epochs (1, 2) of 3 (the recipe's 30, 60, 80 of 90, scaled)" in out
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "d" / "metrics.jsonl") if '"train"' in line]
    peak = 0.1 * 8 / 256
    assert lrs[3] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)


# 8. Evaluation of the right thing.
def test_eval_honours_val_data_refuses_other_classes_and_finds_relative_data(upstream, tmp_path, capsys,
                                                                             monkeypatch):
    ck = upstream / "last.pt"
    other = _images(tmp_path / "other", ["0", "1", "2", "3", "4"], [(12, 12)] * 2)
    code, out, err = run(capsys, "eval", "--checkpoint", ck, "--val-data", other, "--output", tmp_path / "e1")
    assert code == 0, err
    assert json.load(open(tmp_path / "e1" / "eval.json"))["n"] == 10 and str(other) in out
    code, _, err = run(capsys, "eval", "--checkpoint", ck, "--classes", "5", "6", "7", "8", "9",
                       "--output", tmp_path / "e2")
    assert code == 2 and "trained on classes ['0', '1', '2', '3', '4']" in err and "['5', '6', '7', '8', '9']" in err
    # A relative --data at training time: eval and export work from another directory.
    _images(tmp_path / "work" / "imgs" / "train", ["x", "y"], [(12, 12)] * 4)
    _images(tmp_path / "work" / "imgs" / "val", ["x", "y"], [(12, 12)] * 2, seed=1)
    monkeypatch.chdir(tmp_path / "work")
    assert run(capsys, "finetune", *TINY, "--data", "imgs", "--steps", "2", "--output", "out")[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "work" / "out" / "last.pt",
                       "--output", tmp_path / "e3")
    assert code == 0, err
    assert json.load(open(tmp_path / "e3" / "eval.json"))["n"] == 4
    code, _, err = run(capsys, "export", tmp_path / "work" / "out" / "last.pt", "--out", tmp_path / "x")
    assert code == 0, err


# 9. EMA: both the raw and the averaged weights are reported; a too-short average is flagged.
def test_ema_reports_both_and_warns_when_too_short(tmp_path, capsys):
    code, out, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "4", "--base-lr", "0.3",
                         "--ema-decay", "0.9999", "--output", tmp_path)
    assert code == 0
    assert "--ema-decay 0.9999 over 4 steps: the average keeps 100% of the initial weights" in err
    assert "test top-1 (raw weights)" in out and "test top-1 (EMA weights)" in out and "eval and export use" in out
    final = json.load(open(tmp_path / "final_eval.json"))
    assert set(final["ema"]) >= {"top1", "loss", "n"} and 0 <= final["top1"] <= 1


# 10. Fewer than two classes is refused.
def test_fewer_than_two_classes_is_refused(tmp_path, capsys):
    data = _images(tmp_path / "one", ["only"], [(12, 12)] * 3)
    code, _, err = run(capsys, "finetune", *TINY, "--data", data, "--val-data", data, "--steps", "2",
                       "--output", tmp_path / "a")
    assert code == 2 and "1 class(es)" in err and "at least two" in err
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "5", "--steps", "2", "--output", tmp_path / "b")
    assert code == 2 and "--classes needs at least 2 value(s)" in err
    assert not (tmp_path / "a" / "last.pt").exists()


# 11. Every option is checked before any work; errors name the flag; once under torchrun.
@pytest.mark.parametrize("args, words", [
    (["--label-smoothing", "2"], "--label-smoothing must be >= 0 and < 1"),
    (["--device", "mps"], "--device must be cpu, cuda or cuda:N; got 'mps'"),
    (["--momentum", "1.5"], "--momentum must be >= 0 and < 1"),
    (["--mixup-alpha", "-1"], "--mixup-alpha must be >= 0"),
    (["--ema-decay", "1"], "--ema-decay must be >= 0 and < 1"),
    (["--lora-alpha", "4"], "--lora-alpha scales LoRA updates: pass --lora-rank R too"),
    (["--base-lr", "nan"], "--base-lr must be >= 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_bad_options_fail_at_start_naming_the_flag(args, words, tmp_path, capsys):
    code, _, err = run(capsys, "finetune", *TINY, "--classes", "0", "1", "--steps", "2", *args,
                       "--output", tmp_path / "o")
    assert code == 2 and words in err, err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_pretrain_options_name_their_flags_and_torchrun_prints_once(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "pretrain", *TINY, "--epochs", "10", "--decay-epochs", "3", "12",
                       "--output", tmp_path / "o")
    assert code == 2 and "--decay-epochs values must be >= 1 and < 10" in err
    code, _, err = run(capsys, "pretrain", *TINY, "--base-lr", "-1", "--output", tmp_path / "o")
    assert code == 2 and "--base-lr must be >= 0" in err
    monkeypatch.setenv("RANK", "1")
    code, out, err = run(capsys, "finetune", *TINY, "--momentum", "1.5", "--output", tmp_path / "o")
    assert code == 2 and err == "" and out == ""


# 13. Honest messages.
def test_plan_prints_the_lr_used(tmp_path, capsys):
    code, out, _ = run(capsys, "finetune", "--model", "bit_tiny", "--crop", "32", "--classes", "0", "1", "--steps", "1",
                       "--base-lr", "0.24", "--batch-size", "64", "--no-progress", "--no-plots", "--output", tmp_path)
    assert code == 0 and "lr 0.03 (0.24 x 64/512)" in out


def test_stopped_and_finished_runs_say_so(tmp_path, capsys):
    common = ["finetune", *TINY, "--classes", "0", "1", "--steps", "4", "--output", tmp_path]
    code, out, _ = run(capsys, *common, "--stop-at-step", "2")
    assert code == 0 and "stopped early" in out and "after step 2 of 4 (--stop-at-step)" in out
    assert "--resume auto" in out
    assert run(capsys, *common, "--resume", "auto")[0] == 0
    code, out, err = run(capsys, *common, "--resume", "auto")
    assert code == 0 and "is a finished run (step 4 of 4); nothing left to train" in err
    assert "the checkpoint had finished all 4 steps" in out and "time                | 0.0 s" not in out


def test_fewshot_stopped_episodes_say_so(upstream, tmp_path, capsys):
    code, out, _ = run(capsys, "fewshot", "--checkpoint", upstream / "last.pt", "--classes", "5", "6", "--shots", "2",
                       "--seeds", "0", "--methods", "finetune", "--steps", "4", "--batch-size", "4", "--stop-at-step",
                       "2", "--no-progress", "--output", tmp_path)
    assert code == 0 and "stopped early (--stop-at-step: step 2 of 4)" in out and "--resume auto" in out
    assert json.load(open(tmp_path / "fewshot.json"))["stopped_early"]


def test_bit_tiny_is_a_registered_model(capsys):
    import bitfast

    # `bitfast models`: the architectures, then (after a blank line) the published pretrained names
    architectures = run(capsys, "models")[1].split("\n\n")[0].split()
    assert architectures == bitfast.list_models() and "bit_tiny" in bitfast.list_models()
    assert sum(p.numel() for p in bitfast.create_model("bit_tiny", num_classes=5).parameters()) == 2_012_453


def test_pretrained_checkpoint_sets_the_resolution(upstream, tmp_path, capsys):
    code, out, err = run(capsys, "finetune", "--model", "bit_tiny", "--batch-size", "8", "--classes", "5", "6",
                         "--steps", "1", "--pretrained", upstream / "last.pt", "--no-progress", "--no-plots",
                         "--output", tmp_path)
    assert code == 0, err
    assert "crop 32" in out and "resolution 32: the --pretrained checkpoint's" in out


def test_distill_names_its_default_student(upstream, tmp_path, capsys):
    code, out, err = run(capsys, "distill", "--teacher", upstream / "last.pt", "--classes", "0", "1", "2", "3", "4",
                         "--steps", "1", "--batch-size", "4", "--no-progress", "--no-plots", "--output", tmp_path)
    assert code == 0, err
    assert "student resnetv2_50x1_bit (the default student; choose one with --student)" in out


def test_help_and_warning_texts(tmp_path, capsys):
    for command, needle in (("pretrain", "10% of the run"), ("demo", "image resolution"), ("models", "bit_tiny"),
                            ("bench", "strongest baselines")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert needle in text and "%%" not in text, command
    # The skipped-file warning is one line, without a source line of bitfast's code.
    data = _images(tmp_path / "d", ["a", "b"], [(12, 12)] * 2)
    (data / "a" / "broken.png").write_bytes(b"not an image")
    val = _images(tmp_path / "v", ["a", "b"], [(12, 12)] * 2)
    proc = subprocess.run([sys.executable, "-m", "bitfast.cli", "finetune", *TINY, "--data", str(data), "--val-data",
                           str(val), "--steps", "1", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    err = proc.stderr
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "skipped 1 unreadable file" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ImageFolder: skipped")
    assert "ImageFolder(train_root" not in err and "UserWarning" not in err


def test_ensemble_and_int8_labels(upstream, tmp_path, capsys):
    ck = upstream / "last.pt"
    code, out, _ = run(capsys, "eval", "--checkpoint", ck, ck, "--output", tmp_path / "e")
    assert code == 0 and "ensemble of 2 (logits) (raw weights)" in out and "raw, raw" not in out
    code, out, _ = run(capsys, "export", ck, "--out", tmp_path / "x", "--int8")
    assert code == 0 and "became 0 by rounding" in out
