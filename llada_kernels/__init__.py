"""llada-kernels: fused kernels for masked diffusion language models (LLaDA and family).

Importing the package loads the compiled operators (torch.ops.llada.*) and registers the
Triton kernels and the fake (meta) implementations beside them.
"""

from . import _backend, _versions

# The one version check (_versions.py): ImportError for a torch that _C was not compiled
# against; a warning for a torch or Triton below the supported range.
_versions.check_installed()

try:
    from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(llada) registrations)
except ImportError as e:  # a source checkout that was never built, or built for another torch
    _backend._C_ERROR = _versions.explain_load_error(str(e))

from .ops.remask import remask_step  # noqa: E402
from .ops.loss import fused_linear_masked_diffusion_loss, masked_diffusion_loss  # noqa: E402
from .ops.attention import attention, bidirectional_attention, merge_attention  # noqa: E402
from . import masks  # noqa: E402

if _backend._C_ERROR is None:
    _backend.check_cpu_capability_env()
    from .ops import remask as _remask

    _remask.register_fakes()
    from .ops import loss as _loss
    from .ops import attention as _attention

    _loss.register()
    _attention.register()
    if _backend._triton_error() is None:
        from .triton import remask_step as _triton_remask_step  # noqa: F401
        from .triton import masked_diffusion_loss as _triton_loss  # noqa: F401
        from .triton import attention as _triton_attention  # noqa: F401

from ._backend import (BackendUnavailable, available_backends, cpu_capabilities,  # noqa: E402
                       cpu_capability)

__all__ = ["remask_step", "masked_diffusion_loss", "fused_linear_masked_diffusion_loss",
           "attention", "merge_attention", "masks", "bidirectional_attention", "available_backends",
           "BackendUnavailable", "cpu_capability", "cpu_capabilities"]
__version__ = "0.1.0"
