"""The README's main command, ``bitfast story``, in its seconds-long smoke configuration (the
full story is measured by hand and reported in the README, not run in the tests)."""

import json

import pytest

from bitfast import cli
from bitfast.train.recipes.story import StoryConfig

# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_story_smoke_prints_the_table_and_writes_plots(tmp_path, capsys):
    assert cli.main(["story", "--smoke", "--no-progress", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("[1/5] upstream: digits [0, 1, 2, 3, 4]", "ridge head, frozen upstream features, 1-shot",
                 "scaled down for the tiny data", "HyperRule fine-tuning from upstream", "same network from scratch",
                 "PASS: fine-tuned accuracy on digits [5, 6, 7, 8, 9]"):
        assert text in out, text
    report = json.load(open(tmp_path / "story.json"))
    assert report["smoke"] and report["passed"]
    assert set(report["ridge"]) == {"1", "5", "10"} and len(report["ridge"]["5"]["accuracies"]) == 2
    for key in ("upstream", "finetune", "scratch", "fewshot_finetune", "fewshot_scratch"):
        assert key in report
    assert 0.0 <= report["finetune"]["top1"] <= 1.0
    # The exported int8 model is reported beside the float one (a few smoke steps make its
    # accuracy meaningless; the full story's is in the README).
    assert 0.0 <= report["finetune"]["int8_top1"] <= 1.0
    assert report["finetune"]["int8_bytes"] < 0.3 * report["finetune"]["float_bytes"]
    assert "the same, exported with int8 weights" in out
    from bitfast.train import plots

    pngs = ("transfer_vs_scratch.png", "fewshot.png", "reliability.png", "confusion.png", "upstream_loss.png")
    # Plots need matplotlib (an optional dependency; the test extra installs it).
    assert all((tmp_path / name).exists() for name in pngs) == plots.available()
    assert (plots.missing_note() in out) != plots.available()
    assert (tmp_path / "upstream" / "last.pt").exists() and (tmp_path / "finetune" / "metrics.jsonl").exists()


def test_story_exits_nonzero_when_the_accuracy_is_missed(tmp_path, capsys):
    assert cli.main(["story", "--smoke", "--no-progress", "--no-plots", "--min-accuracy", "1.01",
                     "--output", str(tmp_path)]) == 1
    assert "FAIL: fine-tuned accuracy" in capsys.readouterr().out
    assert not json.load(open(tmp_path / "story.json"))["passed"]


def test_story_defaults_are_the_readme_run():
    cfg = StoryConfig()
    assert cfg.min_accuracy == 0.95 and list(cfg.shots) == [1, 5, 10] and not cfg.smoke
    assert cfg.crop == 32 and list(cfg.upstream_classes) == [0, 1, 2, 3, 4] and list(cfg.downstream_classes) == [5, 6, 7, 8, 9]
    smoke = StoryConfig(smoke=True)
    assert smoke.upstream_steps < 10 and smoke.min_accuracy == 0.0
