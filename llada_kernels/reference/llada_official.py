"""Eager transcriptions of LLaDA's public reference code (ML-GSAI/LLaDA generate.py): the
ground truth of the tests and the eager baseline of the benchmarks.

Written from the behaviour described in shared/llada/SEMANTICS.md, in our own words. They keep
the reference's quirks on purpose (a Python loop over the batch, softmax in the logits' dtype,
the chained -inf assignment of confidence_eos_eot_inf), so tests show where our ops agree with
it exactly and where they differ by design.
"""

import torch
import torch.nn.functional as F

EOS_ID = 126081
EOT_ID = 126348


def add_gumbel_noise(logits, temperature):
    """generate.py: exp(l) / (-log u)^T with u ~ U[0, 1) in float64 from the global RNG."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def official_step(logits, x, num_transfer, *, mask_id, block_end, temperature=0.0,
                  remasking="low_confidence", un_logits=None, cfg_scale=0.0,
                  eos_id=None, eot_id=None, logits_eos_inf=False, confidence_eos_eot_inf=False):
    """The inner step of generate(): logits [B, L, V], x [B, L], num_transfer [B] ints,
    block_end an int (the end of the current block). Returns the new x and transfer."""
    if logits_eos_inf or confidence_eos_eot_inf:
        logits = logits.clone()  # the reference writes -inf into its own logits
    if un_logits is not None:
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    mask_index = x == mask_id
    if logits_eos_inf:
        logits[:, :, eos_id] = -torch.inf
    logits_with_noise = add_gumbel_noise(logits, temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    if confidence_eos_eot_inf:
        # At T == 0 both names are the same tensor, so EOS and EoT both leave the softmax.
        logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
    if remasking == "low_confidence":
        p = F.softmax(logits, dim=-1)
        x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == "random":
        x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
    else:
        raise NotImplementedError(remasking)
    x0_p[:, block_end:] = -float("inf")
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -float("inf"))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, select = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer[j, select] = True
    x = x.clone()
    x[transfer] = x0[transfer]
    return x, transfer
