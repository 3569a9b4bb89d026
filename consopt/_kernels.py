"""Import guard for the bundled `triton_kernels` package (SPEC §2)."""

EXPECTED_MARKER = "consopt.triton_kernels/1"


def check_triton_kernels():
    """Return consopt's own `triton_kernels` module, or raise ImportError naming the impostor."""
    import triton_kernels

    marker = getattr(triton_kernels, "CONSOPT_MARKER", None)
    if marker != EXPECTED_MARKER:
        where = getattr(triton_kernels, "__file__", "<unknown>")
        raise ImportError(
            f"consopt found a `triton_kernels` package at {where} that is not its own "
            f"(marker {marker!r}, expected {EXPECTED_MARKER!r}). Another distribution "
            "installs a package with the same name; uninstall it or reinstall consopt "
            "(`pip install --force-reinstall consopt`)."
        )
    return triton_kernels
