"""Linear layers with oneDNN-prepacked weights for CPU decoding.

Decoding multiplies a few dozen rows by each weight matrix per step. On CPU, PyTorch's default
GEMM (MKL) parallelises such skinny products poorly: measured on a 2-core runner with 64 rows and a
688x256 weight, F.linear took ~0.40 ms with 2 threads (slower than with 1) while oneDNN on a weight
reordered once into its blocked layout took ~0.13 ms. This is the same kernel torch.compile's CPU
backend emits, called directly.

The prepacked copy does not follow later in-place updates of the module's weight: call `refresh()`
after loading weights. `packing_available()` probes the private oneDNN ops once; when they are
missing (another torch build) or the device is not a CPU, `Linear` simply calls F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The row count oneDNN is told to expect when choosing a blocked layout; any count still works.
_PACK_ROWS_HINT = 64


@functools.cache
def packing_available(dtype: torch.dtype) -> bool:
    """True when this torch build can prepack and run a linear of `dtype` on CPU through oneDNN."""
    try:
        x, weight = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(x, weight).float(), atol=1e-2, rtol=1e-2))
    except (AttributeError, RuntimeError):
        return False


class Linear:
    """y = act(x W^T + b) for a concatenation of nn.Linear modules sharing one input.

    Concatenating (e.g. q, k, v) turns several small products into one. `activation` is "none"
    or "swish" (SiLU), which oneDNN applies inside the product.
    """

    def __init__(self, modules: list[torch.nn.Linear], packed: bool, activation: str = "none") -> None:
        if activation not in ("none", "swish"):
            raise ValueError(f"activation={activation!r} is not one of 'none', 'swish'")
        self.modules = modules
        self.packed = packed
        self.activation = activation
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the fused (and packed) weight from the modules' current parameters."""
        weight = (
            torch.cat([m.weight for m in self.modules]) if len(self.modules) > 1 else self.modules[0].weight
        )
        biases = [m.bias for m in self.modules]
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    b if b is not None else m.weight.new_zeros(m.out_features)
                    for m, b in zip(self.modules, biases)
                ]
            )
        else:
            self.bias = None
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT) if self.packed else weight
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "")
        out = F.linear(x, self.weight, self.bias)
        return F.silu(out) if self.activation == "swish" else out
