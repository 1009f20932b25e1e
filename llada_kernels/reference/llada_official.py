"""Eager transcriptions of LLaDA's public reference code (ML-GSAI/LLaDA generate.py): the
ground truth of the tests and the eager baseline of the benchmarks.

Written from the behaviour described in shared/llada/SEMANTICS.md, in our own words. They keep
the reference's quirks on purpose (a Python loop over the batch, softmax in the logits' dtype,
the chained -inf assignment of confidence_eos_eot_inf), so tests show where our ops agree with
it exactly and where they differ by design.
"""

import torch
import torch.nn.functional as F

from ..constants import EOS_ID, EOT_ID, MASK_ID


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


# ---- generate.py: the whole sampler --------------------------------------------------------

def get_num_transfer_tokens(mask_index, steps):
    """generate.py: per row, spread the masked count over `steps` (the remainder first).
    mask_index [B, n] bool -> [B, steps] int64."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device,
                                      dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def official_generate(model, prompt, attention_mask=None, steps=128, gen_length=128,
                      block_length=128, temperature=0., cfg_scale=0., remasking="low_confidence",
                      mask_id=MASK_ID, logits_eos_inf=False, confidence_eos_eot_inf=False,
                      eos_id=EOS_ID, eot_id=EOT_ID):
    """generate.py's generate(), step for step. The only change: the EOS and EoT ids, which
    the reference writes as literals (126081, 126348), are arguments so that small test
    vocabularies work. Quirks kept: the Python loop over the batch for topk, the softmax in
    the logits' dtype, and, with cfg_scale > 0 and no attention_mask, a NameError."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id,
                   dtype=torch.long).to(model.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(
            (prompt.shape[0], gen_length), dtype=attention_mask.dtype, device=model.device)], dim=-1)
    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        block_start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, block_start:block_start + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                if attention_mask is not None:
                    attention_mask_ = torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(x_, attention_mask=attention_mask_).logits  # noqa: F821 (the quirk)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits

            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, block_start + block_length:] = -float("inf")

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# ---- get_log_likelihood.py and GUIDELINES.md ------------------------------------------------

def official_loglik_forward_process(batch, prompt_index, mask_id):
    """get_log_likelihood.py: a stratified mask count per row, a random permutation per row."""
    b, l = batch.shape
    target_len = (l - prompt_index.sum()).item()
    k = torch.randint(1, target_len + 1, (), device=batch.device)
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b,
                                   device=batch.device)).long()
    x = ((x - 1) % target_len) + 1
    indices = torch.arange(target_len, device=batch.device).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len)]
    is_mask = torch.cat((torch.zeros(b, prompt_index.sum(), dtype=torch.bool,
                                     device=batch.device), is_mask), dim=1)
    noisy_batch = torch.where(is_mask, mask_id, batch)
    return noisy_batch, (x / target_len).unsqueeze(1).repeat(1, l)


def official_mc_loss(model, seq, perturbed_seq, p_mask, prompt_index, cfg_scale, mask_id):
    """get_log_likelihood.py, one mini-batch: the CE / p_mask sum over masked positions,
    divided by the batch size (with get_logits' CFG)."""
    batch = perturbed_seq
    if cfg_scale > 0.:
        pi = prompt_index.unsqueeze(0).repeat(batch.shape[0], 1)
        un_batch = batch.clone()
        un_batch[pi] = mask_id
        batch = torch.cat([batch, un_batch])
    logits = model(batch).logits
    if cfg_scale > 0.:
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    mask_index = perturbed_seq == mask_id
    loss = F.cross_entropy(logits[mask_index], seq[mask_index], reduction="none") / p_mask[mask_index]
    return loss.sum() / seq.shape[0]


def official_pretrain_loss(logits, input_ids, masked_indices, p_mask):
    """GUIDELINES.md pre-training loss from full logits [B, L, V]."""
    token_loss = F.cross_entropy(logits[masked_indices], input_ids[masked_indices],
                                 reduction="none") / p_mask[masked_indices]
    return token_loss.sum() / (input_ids.shape[0] * input_ids.shape[1])


def official_sft_loss(logits, input_ids, masked_indices, p_mask, prompt_lengths):
    """GUIDELINES.md SFT loss: CE / p_mask / answer_length, summed, divided by B."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    prompt_mask = (positions < prompt_lengths.unsqueeze(1)).to(torch.int64)
    answer_lengths = torch.sum(1 - prompt_mask, dim=-1, keepdim=True).repeat(1, input_ids.shape[1])
    token_loss = F.cross_entropy(logits[masked_indices], input_ids[masked_indices],
                                 reduction="none") / p_mask[masked_indices]
    return torch.sum(token_loss / answer_lengths[masked_indices]) / input_ids.shape[0]
