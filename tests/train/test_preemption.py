"""Pre-emption: SIGTERM or SIGINT in the middle of `bitfast finetune` finishes the step, writes
OUTPUT/last.pt and exits with 128 + the signal's number; `--resume auto` then ends bit for bit
where the uninterrupted run does; under torchrun a restarted worker group (`--max-restarts`)
resumes from OUTPUT/last.pt by itself. Each run is a real process (the CLI or torchrun)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from bitfast.train.checkpoint import load_checkpoint
from bitfast.train.guards import INTERRUPT_EXIT_STATUS
from bitfast.train.progress import MetricsLog

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--classes", "5", "6",
        "--base-lr", "0.3", "--no-progress", "--no-plots", "--log-every", "1"]
STEPS = 40  # ~0.07 s a step on one thread: time enough to signal after step 3 and before the end


def _env() -> dict:
    # One thread in every run (the CLI takes torch's default, which follows OMP_NUM_THREADS): the
    # bit-for-bit comparisons need the same thread count, and tiny batches gain nothing from more.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _finetune_cmd(out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bitfast.cli", "finetune", *TINY, "--steps", str(STEPS), "--output", str(out),
            *extra]


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _last_step(metrics_path) -> int:
    if not os.path.exists(metrics_path):
        return 0
    steps = [0]
    with open(metrics_path) as f:
        for line in f:
            if line.endswith("\n") and '"kind": "train"' in line:
                steps.append(int(line.split('"step": ')[1].split(",")[0]))
    return max(steps)


def _signal_mid_run(out, signum: int, after_step: int = 3) -> tuple[int, str]:
    """Start `bitfast finetune` into ``out``, send ``signum`` once its metrics show
    ``after_step`` steps done, and return (exit status, stderr)."""
    with open(out.parent / f"{out.name}.stdout", "w+") as so, open(out.parent / f"{out.name}.stderr", "w+") as se:
        proc = subprocess.Popen(_finetune_cmd(out), env=_env(), stdout=so, stderr=se)
        try:
            deadline = time.monotonic() + 90
            while _last_step(out / "metrics.jsonl") < after_step:
                assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {after_step}"
                assert time.monotonic() < deadline, "no training step logged in 90 s"
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before it could be signalled: raise STEPS"
            proc.send_signal(signum)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        se.seek(0)
        return code, se.read()


def _assert_same_final_state(a, b) -> None:
    """The two runs' final last.pt: the same step, weights and optimizer state, bit for bit."""
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["step"] == sb["step"]
    assert sa["model"].keys() == sb["model"].keys()
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), f"weight {k} differs"
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and oa
    buffers = 0
    for i, st in oa.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ob[i][key]), f"optimizer state {i}/{key} differs"
                buffers += key == "momentum_buffer"
    assert buffers == len(oa)  # every parameter's momentum buffer was compared
    # The metrics agree too: the resumed run dropped the records after its checkpoint and
    # wrote them again, each step once, with the same losses.
    ra = [r for r in MetricsLog.read(a / "metrics.jsonl") if r["kind"] == "train"]
    rb = [r for r in MetricsLog.read(b / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, sa["step"] + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(a / "metrics.jsonl")
             if '"kind": "train"' in line]
    assert steps == list(range(1, sa["step"] + 1))


def test_sigterm_mid_run_saves_and_resume_is_bitwise_equal(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    code, err = _signal_mid_run(out, signal.SIGTERM)
    assert code == INTERRUPT_EXIT_STATUS[signal.SIGTERM] == 143, err
    state = load_checkpoint(out / "last.pt")
    k = state["step"]
    assert 3 <= k < STEPS
    assert "stopped by SIGTERM" in state["note"]
    assert "SIGTERM: finishing this step" in err
    assert f"stopped by SIGTERM after step {k} of {STEPS}" in err and str(out / "last.pt") in err
    assert "--resume auto" in err  # the message says how to continue
    assert not (out / "final_eval.json").exists()  # stopped: no final evaluation

    resumed = _run(_finetune_cmd(out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last.pt'} at step {k}/{STEPS}" in resumed.stderr
    full = _run(_finetune_cmd(ref))
    assert full.returncode == 0, full.stderr
    _assert_same_final_state(out, ref)
    assert load_checkpoint(out / "last.pt")["step"] == STEPS


def test_sigint_exit_status(tmp_path):
    out = tmp_path / "run"
    code, err = _signal_mid_run(out, signal.SIGINT)
    assert code == INTERRUPT_EXIT_STATUS[signal.SIGINT] == 130, err
    k = load_checkpoint(out / "last.pt")["step"]
    assert 3 <= k < STEPS
    assert f"stopped by SIGINT after step {k} of {STEPS}" in err and "Traceback" not in err


# Run by torchrun in each worker: `bitfast finetune` on CPU with gloo, where rank 1 of the first
# worker group (TORCHELASTIC_RESTART_COUNT 0) dies right after step DIE_AFTER_STEP when that is set.
WORKER = """
import os
import sys

from bitfast import cli
from bitfast.train import progress

die_after = int(os.environ.get("DIE_AFTER_STEP") or 0)
if die_after and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    write = progress.MetricsLog.write  # called every logged step on every rank (a no-op off rank 0)

    def write_then_die(self, **record):
        write(self, **record)
        if record.get("kind") == "train" and record.get("step") == die_after:
            print(f"rank 1: dying after step {die_after}", file=sys.stderr, flush=True)
            os._exit(1)

    progress.MetricsLog.write = write_then_die
sys.exit(cli.main(["finetune", *sys.argv[1:]]))
"""


def test_torchrun_restart_resumes_from_last_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))

    def torchrun(out, die_after: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", str(script), *TINY, "--steps", "8", "--checkpoint-every", "2",
               "--device", "cpu", "--output", str(out)]
        # torchrun's default: the workers share its rendezvous store (init_distributed keeps each
        # attempt's keys apart; without that the restarted group cannot connect).
        env = {**_env(), "DIE_AFTER_STEP": str(die_after)}
        # Its own process group: on a timeout the workers go too, not only torchrun.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"torchrun did not finish in 120 s:\n{err[-4000:]}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    out, ref = tmp_path / "run", tmp_path / "ref"
    # Rank 1 dies after step 5: the checkpoint of step 4 is on disk (rank 1 cannot finish step 5's
    # gradient all-reduce before rank 0 has written it), the one of step 6 is not.
    died = torchrun(out, die_after=5)
    assert died.returncode == 0, died.stderr[-4000:]
    assert "rank 1: dying after step 5" in died.stderr
    assert f"restarted by torchrun (restart 1); resuming from {out / 'last.pt'}" in died.stderr
    assert f"resumed from {out / 'last.pt'} at step 4/8" in died.stderr
    whole = torchrun(ref, die_after=0)
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert "dying" not in whole.stderr and "restarted by torchrun" not in whole.stderr
    _assert_same_final_state(out, ref)
    assert load_checkpoint(out / "last.pt")["step"] == 8
