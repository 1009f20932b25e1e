"""Deprecated alias: the training and evaluation helpers live in `llada_kernels.training`,
and `patch_llada` in `llada_kernels.patch`. Old imports (`from llada_kernels import trainer`,
`trainer.pretrain_loss(...)`) keep working, with a DeprecationWarning."""

import warnings

import torch

from .constants import MASK_ID as LLADA_MASK_ID  # noqa: F401
from .patch import patch_llada  # noqa: F401
from .training import (forward_process, hidden_and_head, log_likelihood,  # noqa: F401
                       mc_batch_loss, mc_forward_process, pretrain_loss, sft_loss)

warnings.warn("llada_kernels.trainer is deprecated: import llada_kernels.training (and "
              "llada_kernels.patch for patch_llada)", DeprecationWarning, stacklevel=2)


def stratified_masks(b, prompt_length, answer_length, *, device=None, generator=None):
    """Deprecated: `training.mc_forward_process` is the estimator's noise. Returns its masked
    [b, Lp + T] bool and ratio [b]."""
    seq = torch.zeros(b, prompt_length + answer_length, dtype=torch.long, device=device)
    _, masked, ratio = mc_forward_process(seq, prompt_length, generator=generator)
    return masked, ratio
