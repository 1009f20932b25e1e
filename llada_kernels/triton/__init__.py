"""Triton kernels. Each module registers its kernels for the `<op>_triton` operator."""
