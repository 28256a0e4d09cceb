"""Weight-sized copies around one weight-standardized convolution, forward and backward.

A 512x512x3x3 convolution (BiT-R50x1's last stage) on a 16x512x4x4 channels_last input,
with the weight contiguous or channels_last (as ``model.to(memory_format=torch.channels_last)``
leaves it), standardized by bitfast's auto backend, by the timm-style eager formula, or not
at all. Prints each weight-sized ``aten::copy_`` that ``torch.profiler`` records in one
forward+backward and their total time: every copy is a layout conversion that one of the
pieces made.

    python tools/ws_layout_copies.py
"""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bitfast

SHAPE = (512, 512, 3, 3)


def eager_standardize(w: torch.Tensor) -> torch.Tensor:
    """The eager formula, elementwise on w (keeps w's layout)."""
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) / torch.sqrt(var + 1e-8)


def weight_copies(standardize, weight_format: torch.memory_format) -> list[float]:
    """Milliseconds of each weight-sized copy in one forward+backward (after two warm-ups)."""
    torch.manual_seed(0)
    w = torch.randn(SHAPE).contiguous(memory_format=weight_format).requires_grad_()
    x = torch.randn(16, 512, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(2):
        F.conv2d(x, standardize(w), padding=1).sum().backward()
    w.grad = x.grad = None
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        F.conv2d(x, standardize(w), padding=1).sum().backward()
    return [e.cpu_time_total / 1e3 for e in prof.events() if e.name == "aten::copy_" and e.input_shapes[:1] == [list(SHAPE)]]


def main() -> None:
    """Print the copies of each case."""
    cases = {
        "bitfast": lambda w: bitfast.ops.weight_standardize(w),
        "eager formula": eager_standardize,
        "no standardization": lambda w: w,
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backend: "
          f"{bitfast.backends.resolve('weight_standardize', 'cpu', torch.float32, None)}")
    for name, fn in cases.items():
        for fmt_name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            ms = weight_copies(fn, fmt)
            print(f"{name:>20}, {fmt_name:>13} weight: {len(ms)} weight-sized copies, {sum(ms):.1f} ms "
                  f"({', '.join(f'{m:.1f}' for m in ms)})")


if __name__ == "__main__":
    main()
