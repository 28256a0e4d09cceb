"""The adaptation and deployment commands on tiny data (``bit_tiny`` at 32x32, a few steps):
``bitfast finetune --lora-rank``, ``bitfast distill``, ``bitfast export``, and clear errors
for bad input."""

import json

import pytest
import torch

from bitfast import cli
from bitfast.train.checkpoint import load_checkpoint

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--no-progress", "--log-every", "1",
        "--no-plots"]


# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A short LoRA fine-tuning run on digits 0-2, shared by several tests."""
    out = tmp_path_factory.mktemp("lora")
    code = cli.main(["finetune", *TINY, "--classes", "0", "1", "2", "--steps", "4", "--base-lr", "0.5",
                     "--lora-rank", "4", "--lora-alpha", "8", "--output", str(out)])
    assert code == 0
    return out


def test_finetune_lora_trains_only_the_updates_and_head(lora_run, capsys):
    state = load_checkpoint(str(lora_run / "last.pt"))
    assert state["config"]["lora_rank"] == 4 and state["config"]["lora_alpha"] == 8
    weights = state["model"]
    a_keys = [k for k in weights if k.endswith(".lora_A")]
    assert len(a_keys) == 16 and not any(k.startswith("stem.") for k in a_keys)
    # The updates moved off their zero start; the optimizer holds state for the trained tensors only.
    assert any(weights[k.replace("lora_A", "lora_B")].abs().sum() > 0 for k in a_keys)
    trained = sum(1 for st in state["optimizer"]["state"].values() if st)
    assert trained == 2 * 16 + 2  # A and B of each wrapped conv, head weight and bias


def test_finetune_lora_prints_report(tmp_path, capsys):
    code = cli.main(["finetune", *TINY, "--classes", "3", "4", "--steps", "1", "--lora-rank", "2",
                     "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "LoRA: 16 convs wrapped (rank [2])" in out and "saves" in out and "MiB" in out


def test_eval_loads_the_lora_checkpoint_merged(lora_run, tmp_path):
    assert cli.main(["eval", "--checkpoint", str(lora_run / "last.pt"), "--output", str(tmp_path)]) == 0
    ev = json.load(open(tmp_path / "eval.json"))
    final = json.load(open(lora_run / "final_eval.json"))
    # The merged plain model computes what the LoRA-wrapped model computed at the end of training.
    assert ev["loss"] == pytest.approx(final["loss"], rel=1e-4) and ev["top1"] == pytest.approx(final["top1"])


def test_lora_rank_too_large_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["finetune", *TINY, "--classes", "0", "1", "--steps", "1", "--lora-rank", "100000",
                     "--output", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--lora-rank 100000" in err and "rank must be <=" in err
    code = cli.main(["finetune", *TINY, "--classes", "0", "1", "--steps", "1", "--lora-rank", "2", "--linear-probe",
                     "--output", str(tmp_path)])
    assert code == 2 and "exclude each other" in capsys.readouterr().err


def test_distill_reports_teacher_and_student(lora_run, tmp_path, capsys):
    out = tmp_path / "kd"
    code = cli.main(["distill", "--teacher", str(lora_run / "last.pt"), "--student", "bit_tiny", *TINY[2:],
                     "--classes", "0", "1", "2", "--steps", "2", "--alpha", "0.5", "--temperature", "2",
                     "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "bitfast distill: teacher bit_tiny from" in text and "0.5 T^2 KL, T 2.0" in text
    report = json.load(open(out / "distill.json"))
    # The teacher is the LoRA run's merged model: its accuracy is that run's final accuracy.
    assert report["teacher_top1"] == pytest.approx(json.load(open(lora_run / "final_eval.json"))["top1"])
    assert report["student_top1"] == pytest.approx(json.load(open(out / "final_eval.json"))["top1"])
    assert report["steps"] == 2 and report["alpha"] == 0.5 and report["temperature"] == 2.0
    state = load_checkpoint(str(out / "last.pt"))
    assert state["teacher"] == str(lora_run / "last.pt") and state["config"]["model"] == "bit_tiny"


def test_distill_bad_teacher_is_a_clear_error(lora_run, tmp_path, capsys):
    base = ["distill", "--student", "bit_tiny", *TINY[2:], "--steps", "1", "--output", str(tmp_path)]
    # A 3-class teacher and 2-class data.
    assert cli.main([*base, "--teacher", str(lora_run / "last.pt"), "--classes", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "predicts 3 classes and the student's data has 2" in err and "--classes" in err
    # The same count, other classes.
    assert cli.main([*base, "--teacher", str(lora_run / "last.pt"), "--classes", "5", "6", "7"]) == 2
    assert "trained on classes ['0', '1', '2']" in capsys.readouterr().err
    assert cli.main([*base, "--teacher", str(tmp_path / "missing.pt"), "--classes", "0", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main([*base, "--teacher", "not_a_model", "--classes", "0", "1"]) == 2
    assert "neither a file nor a model" in capsys.readouterr().err


_LOAD_WITHOUT_BITFAST = """
import json, sys
sys.modules["bitfast"] = None  # any import of bitfast fails
sys.path.insert(0, sys.argv[1])
import torch
from bitfast_plain_model import PlainResNetV2, load_int8_state_dict
config = json.load(open(sys.argv[1] + "/config.json"))
x = torch.load(sys.argv[2])
float_model = PlainResNetV2(**config)
float_model.load_state_dict(torch.load(sys.argv[1] + "/model.pt"))
int8_model = load_int8_state_dict(PlainResNetV2(**config), torch.load(sys.argv[1] + "/model_int8.pt"))
with torch.no_grad():
    torch.save({"float": float_model(x), "int8": int8_model(x)}, sys.argv[3])
"""


def test_export_prune_int8_report_and_load_without_bitfast(lora_run, tmp_path, capsys):
    import subprocess
    import sys

    from bitfast.train.build import model_from_checkpoint

    out = tmp_path / "export"
    code = cli.main(["export", str(lora_run / "last.pt"), "--out", str(out), "--prune", "0.5", "--int8"])
    assert code == 0
    text = capsys.readouterr().out
    assert "conv sparsity" in text and "int8 weights (pruned)" in text and "test top-1" in text
    report = json.load(open(out / "export.json"))
    trained, exported, pruned, int8 = report["variants"]
    # Export changes nothing; the digits test split of the checkpoint's classes is the default eval set.
    assert exported["eval"]["top1"] == trained["eval"]["top1"] and exported["eval"]["n"] == trained["eval"]["n"] > 100
    assert exported["eval"]["loss"] == pytest.approx(trained["eval"]["loss"], rel=1e-4)
    assert exported["sparsity"] == 0 and pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert int8["sparsity"] >= pruned["sparsity"] and int8["MiB"] < 0.3 * exported["MiB"]
    # The exported files load with torch alone (the one-file module written next to them).
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_BITFAST, str(out), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True)
    y = torch.load(tmp_path / "y.pt")
    model, _ = model_from_checkpoint(str(lora_run / "last.pt"))
    with torch.no_grad():
        torch.testing.assert_close(y["float"], model(x), rtol=1e-4, atol=1e-4)
    assert (y["int8"] - y["float"]).abs().max() < 0.5  # pruned + int8: close, not equal


def test_export_bad_input_is_a_clear_error(lora_run, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["export", str(lora_run / "last.pt"), "--out", str(tmp_path / "o"), "--structured"]) == 2
    assert "pass --prune AMOUNT" in capsys.readouterr().err
    assert cli.main(["export", str(lora_run / "last.pt"), "--out", str(tmp_path / "o"), "--prune", "1.5"]) == 2
    assert "--prune must be a fraction" in capsys.readouterr().err
    assert cli.main(["export", str(lora_run / "last.pt"), "--out", str(tmp_path / "o"), "--classes", "0", "1"]) == 2
    assert "the checkpoint has 3 classes" in capsys.readouterr().err


def test_distill_alpha_zero_is_finetuning(lora_run, tmp_path):
    """With alpha 0 the loss is the plain cross-entropy: the run replays bitfast finetune's."""
    common = [*TINY[2:], "--classes", "0", "1", "2", "--steps", "2", "--base-lr", "0.5", "--eval-every", "0"]
    assert cli.main(["finetune", "--model", "bit_tiny", *common, "--output", str(tmp_path / "ft")]) == 0
    assert cli.main(["distill", "--teacher", str(lora_run / "last.pt"), "--student", "bit_tiny", "--alpha", "0",
                     *common, "--output", str(tmp_path / "kd")]) == 0
    assert cli.main(["distill", "--teacher", str(lora_run / "last.pt"), "--student", "bit_tiny", "--alpha", "1",
                     *common, "--output", str(tmp_path / "kd1")]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")
                if json.loads(line)["kind"] == "train"]

    assert losses("kd") == pytest.approx(losses("ft"), rel=1e-5)
    assert losses("kd1")[0] != pytest.approx(losses("ft")[0], rel=1e-3)  # the teacher's term is in the loss


def test_new_commands_help(capsys):
    for command, flag in (("distill", "--teacher"), ("export", "--int8"), ("finetune", "--lora-rank")):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert flag in out and "default" in out
