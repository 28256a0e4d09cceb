"""Every bitfast op schema, defined exactly once, here.

Two families of ops live in the ``bitfast`` namespace:

* **Public ops** (``weight_standardize_fwd``, ``group_norm_relu_fwd`` ...): functional ops
  with a trailing ``str backend`` argument naming the implementation that computes them
  (``reference``, ``cpp``, ``cuda`` or ``triton``). They have a Python kernel for CPU and
  CUDA that hands the work to that backend, a fake (meta) implementation, and, for the
  forward ops, an autograd formula whose backward is itself a registered op. The backend is
  an argument rather than global state so that ``torch.compile`` sees it as a constant.
* **Native ops** (``native_*``): the same computations without the backend argument. Their
  kernels are attached from C++ (``TORCH_LIBRARY_IMPL(bitfast, CPU, m)`` in ``csrc/cpu``) and
  CUDA (``TORCH_LIBRARY_IMPL(bitfast, CUDA, m)`` in ``csrc/cuda``). The schemas are defined
  here so the ops (and their fakes) exist even when no native build loaded; the ``cpp`` and
  ``cuda`` backends call them.

Conventions shared by every op:

* statistics (mean, rstd, var) are float32 whatever the input dtype;
* ``weight_standardize`` statistics have shape ``(O,)``; GroupNorm statistics ``(N, G)``;
  BatchNorm statistics ``(C,)``;
* outputs keep the input's dtype and memory format.
"""

from __future__ import annotations

import torch

NAMESPACE = "bitfast"

lib = torch.library.Library(NAMESPACE, "DEF")

# name -> schema body, without the backend argument. Each entry defines a public op
# ``name(..., str backend)`` and a native op ``native_name(...)``.
SCHEMAS: dict[str, str] = {
    "weight_standardize_fwd": (
        "(Tensor w, float eps) -> (Tensor out, Tensor mean, Tensor rstd)"
    ),
    "weight_standardize_bwd": (
        "(Tensor grad_out, Tensor w, Tensor mean, Tensor rstd) -> Tensor"
    ),
    "group_norm_relu_fwd": (
        "(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool relu)"
        " -> (Tensor y, Tensor mean, Tensor rstd)"
    ),
    "group_norm_relu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd,"
        " int num_groups, bool relu) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
    # The residual sum s = a + b of a pre-activation ResNet fused with the next unit's
    # GroupNorm+ReLU: returns s and y = relu(group_norm(s)). The backward's grad_input is
    # the gradient of a and of b alike: grad_sum (None: zero) plus that of y through s.
    "group_norm_relu_add_fwd": (
        "(Tensor a, Tensor b, Tensor? weight, Tensor? bias, int num_groups, float eps, bool relu)"
        " -> (Tensor sum, Tensor y, Tensor mean, Tensor rstd)"
    ),
    "group_norm_relu_add_bwd": (
        "(Tensor grad_y, Tensor? grad_sum, Tensor sum, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, int num_groups, bool relu)"
        " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
    ),
    "batch_norm_relu_fwd": (
        "(Tensor x, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias,"
        " bool training, float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)"
    ),
    "batch_norm_relu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var,"
        " bool training, float eps, bool relu)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
    # Running statistics are updated by their own (mutating) op: PyTorch only accepts
    # autograd formulas on functional ops, so the forward above cannot mutate them.
    "batch_norm_update_stats_": (
        "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float momentum, int count) -> ()"
    ),
    "sgd_momentum_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr,"
        " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
        " bool is_first_step, Tensor? lr_tensor, Tensor(c!)[] ema_params, float ema_decay) -> ()"
    ),
}


def _with_backend(schema: str) -> str:
    args, _, ret = schema.partition(") ->")
    return f"{args}, str backend) ->{ret}"


for _name, _schema in SCHEMAS.items():
    lib.define(_name + _with_backend(_schema))
    lib.define("native_" + _name + _schema)

# std_conv2d is a composite of weight_standardize_fwd and aten's convolution: autograd,
# fakes and compilation all flow through its decomposition.
lib.define(
    "std_conv2d(Tensor x, Tensor weight, Tensor? bias, SymInt[2] stride, SymInt[2] padding,"
    " SymInt[2] dilation, SymInt groups, float eps, str backend) -> Tensor"
)


def qualname(name: str) -> str:
    """``bitfast::name``: the qualified name of the op ``name``."""
    return f"{NAMESPACE}::{name}"


def has_native_kernel(name: str, device_type: str) -> bool:
    """Whether a native build attached a kernel for ``native_<name>`` on ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname("native_" + name), key)
