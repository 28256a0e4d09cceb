"""bitfast's Triton kernels (installed as ``bitfast.kernels``).

One module per op: ``@triton.jit`` kernels and plain launchers, no autograd and no
nn.Module (those live in ``bitfast.ops``). Importing this package does not import
Triton; each kernel module does.
"""
