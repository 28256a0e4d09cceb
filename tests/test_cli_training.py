"""The training commands on tiny data: finetune, pretrain, fewshot, eval (each a few steps of
the 2M-parameter ``bit_tiny`` at 32x32), their --help, and clear errors for bad input."""

import json
import os

import pytest

from bitfast import cli

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--no-progress", "--log-every", "1"]


# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Two short fine-tuning runs on digits 0-2 (two seeds), shared by several tests."""
    root = tmp_path_factory.mktemp("ft")
    outs = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        code = cli.main(["finetune", *TINY, "--classes", "0", "1", "2", "--steps", "3", "--eval-every", "2",
                         "--seed", str(seed), "--output", str(out), "--base-lr", "0.5", *(["--no-plots"] if seed else [])])
        assert code == 0
        outs.append(out)
    return outs


def test_finetune_writes_checkpoint_metrics_plots(finetuned, capsys):
    from bitfast.train import plots

    out = finetuned[0]
    for name in ("last.pt", "metrics.jsonl", "final_eval.json"):
        assert (out / name).exists(), name
    pngs = ("loss.png", "lr.png", "accuracy.png", "reliability.png", "confusion.png")
    # Plots need matplotlib (an optional dependency; the test extra installs it).
    assert all((out / name).exists() for name in pngs) == plots.available()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 3]
    final = json.load(open(out / "final_eval.json"))
    assert final["classes"] == ["0", "1", "2"] and final["n"] > 100 and 0 <= final["top1"] <= 1


def test_finetune_prints_plan_and_summary(tmp_path, capsys):
    code = cli.main(["finetune", *TINY, "--classes", "3", "4", "--schedule", "1", "2", "3", "4", "4",
                     "--output", str(tmp_path), "--no-plots"])
    assert code == 0
    out = capsys.readouterr().out
    assert "HyperRule: n=" in out and "schedule [1, 2, 3, 4, 4]" in out and "lr 4.69e-05 (0.003 x 8/512)" in out
    assert "bitfast finetune: summary" in out and "test top-1" in out


def test_resume_with_other_classes_is_a_clear_error(finetuned, capsys):
    code = cli.main(["finetune", *TINY, "--classes", "0", "1", "--steps", "4", "--output", str(finetuned[0]),
                     "--resume", "auto"])
    assert code == 2
    err = capsys.readouterr().err
    assert "3-class head, this run's data has 2 classes" in err and "another --output" in err


def test_eval_single_and_ensemble(finetuned, tmp_path, capsys):
    a, b = (str(o / "last.pt") for o in finetuned)
    assert cli.main(["eval", "--checkpoint", a, "--output", str(tmp_path / "one")]) == 0
    one = json.load(open(tmp_path / "one" / "eval.json"))
    assert one["top1"] == pytest.approx(json.load(open(finetuned[0] / "final_eval.json"))["top1"])
    assert cli.main(["eval", "--checkpoint", a, b, "--output", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2 (logits)" in out and "ECE (15 bins)" in out and "confusion matrix" in out
    two = json.load(open(tmp_path / "two" / "eval.json"))
    assert two["checkpoints"] == [a, b] and sum(map(sum, two["confusion"])) == two["n"] == one["n"]
    from bitfast.train import plots

    assert (tmp_path / "two" / "reliability.png").exists() == plots.available()


def test_fewshot_ridge_and_finetune_episodes(finetuned, tmp_path, capsys):
    code = cli.main(["fewshot", "--checkpoint", str(finetuned[0] / "last.pt"), "--classes", "5", "6", "7",
                     "--shots", "1", "2", "--seeds", "0", "1", "--methods", "ridge", "finetune", "--steps", "2",
                     "--batch-size", "6", "--no-progress", "--output", str(tmp_path)])
    assert code == 0
    res = json.load(open(tmp_path / "fewshot.json"))
    assert set(res) == {"ridge", "finetune"} and set(res["ridge"]) == {"1", "2"}
    assert len(res["finetune"]["2"]["accuracies"]) == 2 and 0 <= res["ridge"]["1"]["mean"] <= 1
    assert "shots/class" in capsys.readouterr().out


def test_pretrain_step_schedule(tmp_path, capsys):
    code = cli.main(["pretrain", *TINY, "--classes", "0", "1", "--epochs", "2", "--steps-per-epoch", "2",
                     "--decay-epochs", "1", "--warmup-steps", "1", "--output", str(tmp_path), "--no-plots"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 epochs x 2 steps = 4 steps of 8, lr 0.000937 (0.03 x 8/256)" in out and "weight decay 0.0001" in out
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"train"' in line]
    assert lrs == pytest.approx([0.0, 0.03 * 8 / 256, 0.03 * 8 / 2560, 0.03 * 8 / 2560])


def test_help_documents_defaults(capsys):
    for command in ("finetune", "pretrain", "fewshot", "eval", "story"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert "default" in capsys.readouterr().out


def _folder(root, classes=("cat", "dog"), n=3, size=12, corrupt=None):
    from PIL import Image

    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (40 * c + 10 * i, 100, 200 - 50 * c)).save(root / name / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"not an image")


def test_imagefolder_finetune_and_bad_input(tmp_path, capsys):
    _folder(tmp_path / "data" / "train", corrupt=True)
    _folder(tmp_path / "data" / "val")
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        code = cli.main(["finetune", *TINY, "--data", str(tmp_path / "data"), "--steps", "2", "--output",
                         str(tmp_path / "out"), "--no-plots"])
    assert code == 0
    assert "1 unreadable file(s) skipped" in capsys.readouterr().out and (tmp_path / "out" / "final_eval.json").exists()

    def error(*args):
        assert cli.main(["finetune", *TINY, "--steps", "1", *args]) == 2
        return capsys.readouterr().err

    assert "is not a directory" in error("--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o1"))
    os.makedirs(tmp_path / "empty")
    assert "no class folders" in error("--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o2"))
    _folder(tmp_path / "holes")
    os.makedirs(tmp_path / "holes" / "bird")
    assert "'bird'" in error("--data", str(tmp_path / "holes"), "--output", str(tmp_path / "o3")).replace(
        str(tmp_path / "holes") + os.sep, "'")
    assert "minimum of 32 pixels" in error("--crop", "16", "--output", str(tmp_path / "o4"))
    (tmp_path / "afile").write_text("x")
    assert "cannot be created" in error("--classes", "0", "1", "--output", str(tmp_path / "afile" / "out"))
    assert "--batch-size must be >= 1" in error("--batch-size", "0", "--output", str(tmp_path / "o5"))
