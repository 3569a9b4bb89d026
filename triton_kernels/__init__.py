"""Triton kernels of consopt: pure functions of tensors and integer tables.

No nn.Module logic lives here. `consopt` checks `CONSOPT_MARKER` to make sure the
`triton_kernels` it imports is this one (other distributions use the same name).
Triton itself is imported by the kernel modules, not here, so that importing this
package stays cheap and TRITON_INTERPRET can still be set before triton loads.

Modules: `sgd_stats` (the fused SGD step and the law statistics) and `project` (the diagonal
symmetry action and translation shift of the projection mode).
"""

CONSOPT_MARKER = "consopt.triton_kernels/1"

__all__ = ["CONSOPT_MARKER"]
