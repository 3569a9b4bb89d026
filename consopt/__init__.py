"""consopt: conservation-aware PyTorch optimizers.

    laws = consopt.find_laws(model, example_inputs)      # every conservation law of the model
    opt = consopt.SGD(model.parameters(), lr=1e-2, laws=laws)
    opt.step(); opt.deviation()                           # h(θ_t) − h(θ_0), float64, per family
"""

from ._kernels import check_triton_kernels as _check_triton_kernels
from .laws import Family, LawSet, Term

_check_triton_kernels()

__version__ = "0.1.0"

__all__ = ["Family", "LawSet", "Term", "find_laws", "count_laws", "SGD", "__version__"]


def __getattr__(name):
    # Lazy: keeps `import consopt` cheap and lets each piece load only when used.
    if name == "find_laws":
        from .discover import find_laws

        return find_laws
    if name == "count_laws":
        from .lie import count_laws

        return count_laws
    if name == "SGD":
        from .sgd import SGD

        return SGD
    raise AttributeError(f"module 'consopt' has no attribute {name!r}")
