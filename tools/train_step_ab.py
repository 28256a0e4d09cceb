"""BiT-R50x1 training step on CPU, 128x128, batch 16, fp32, channels_last: bitfast (auto
backends: the C++ kernels and FusedSGD) against the timm-style eager baseline, measured in
interleaved rounds with the same case factory as ``bitfast bench`` (which, without
``--quick``, also compiles the whole model: minutes on 2 cores).

    python tools/train_step_ab.py [ROUNDS]
"""

import statistics
import sys

import torch

from bitfast import bench

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
cases = {}
for impl in ("bitfast", "eager"):
    spec = bench.Spec("train_step", "R50x1 128px b16", "fp32", "channels_last", "step", impl)
    cases[impl] = bench.make_case(spec, "cpu", quick=False)
    cases[impl].check()
times = {k: [] for k in cases}
for _ in range(rounds):
    for k, c in cases.items():
        ts = bench.time_fn(c.fn, "cpu", min_time=0.0, min_reps=3, max_reps=3, warmup=1)
        times[k].append(statistics.median(ts))
for k, v in times.items():
    print(k, "median s/step", round(statistics.median(v), 3), "img/s", round(16 / statistics.median(v), 1), "rounds", [round(x, 3) for x in v])
print("bitfast / eager speed-up: %.2fx" % (statistics.median(times["eager"]) / statistics.median(times["bitfast"])))
print("torch", torch.__version__, "threads", torch.get_num_threads())
