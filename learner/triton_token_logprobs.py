"""Fused Triton forward of learner/token_logprobs.py: LM head matmul + online logsumexp + target gather
+ entropy in one kernel, so no [N, V] (nor [chunk, V]) logits ever reach global memory.

Each program owns BLOCK_N tokens and walks the vocabulary in BLOCK_V tiles. For a tile it forms the
[BLOCK_N, BLOCK_V] logits in registers (tl.dot over BLOCK_H slices of H, fp32 accumulation), rounds
them to the input dtype (the naive path's lm_head returns bf16 logits for a bf16 model; the rounding
keeps this kernel on the same numbers), divides by the temperature, and folds the tile into running
per-token statistics, rescaled whenever the running max m grows (the "online softmax"):

    s = sum_j exp(x_j - m),   e = sum_j exp(x_j - m) * x_j,   x_target picked when the tile holds it
    logsumexp = m + log s,    logprob = x_target - logsumexp,  entropy = logsumexp - e / s

The columns past V in the last tile are masked to -inf (they add nothing to s or e). A target
outside [0, V) matches no column: its logprob is NaN, never a plausible number.

Backward: the chunked torch recompute of token_logprobs.py (cuBLAS matmuls for grad_hidden and
grad_weight). Its cost is two matmuls per chunk that cuBLAS already does at peak; a fused Triton
backward would need a split-V reduction for grad_hidden and atomics or a second pass for grad_weight,
which is much more kernel to get right for little gain. One implementation of the backward also
means the two backends cannot disagree on gradients.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernel runs on CPU tensors in
Triton's numpy interpreter. Two interpreter defects of triton 3.9 are worked around: tl.dot of bf16
operands returns garbage, so there the operands are upcast to fp32 first (exact: bf16 products are
exact in fp32, as in a bf16 MMA with fp32 accumulation); and its fp32 -> bf16 cast truncates, so the
logits are rounded to bf16 on the bits (round to nearest even, torch's rule) on every device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

# Tile sides (untuned: not yet measured on a GPU). Each program re-reads the whole weight, so a
# larger BLOCK_N means less weight traffic; 16 is tl.dot's smallest side.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64


@triton.jit
def sampled_token_logprobs_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    logprobs_ptr,
    logsumexp_ptr,
    entropy_ptr,
    n_tokens,
    vocab_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    temperature,
    WITH_ENTROPY: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_hits = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for vocab_start in range(0, vocab_size, BLOCK_V):
        cols = vocab_start + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab_size
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        # int64 offsets: V * H passes 2**31 for large vocabularies (256k x 8192)
        for h_start in range(0, hidden_size, BLOCK_H):
            ks = h_start + tl.arange(0, BLOCK_H)
            k_mask = ks < hidden_size
            h = tl.load(
                hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                weight_ptr + cols.to(tl.int64)[:, None] * stride_weight + ks[None, :],
                mask=col_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if UPCAST_DOT:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if ROUND_TO_BF16:
            # round to nearest even on the bits, as torch does: the interpreter's fp32 -> bf16 cast
            # truncates (triton 3.9), so .to(tl.bfloat16) would differ between CPU and GPU
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            logits = bits.to(tl.float32, bitcast=True)
        else:
            logits = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32)  # fp32: a no-op; fp16: RTNE
        x = logits / temperature
        x = tl.where(col_mask[None, :], x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))  # finite: every tile has a real column
        rescale = tl.exp(running_max - new_max)  # 0 on the first tile (exp(-inf))
        p = tl.exp(x - new_max[:, None])  # 0 in the masked columns
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            # p is 0 in the masked columns but x is -inf there: 0 * -inf would be NaN
            sum_exp_x = sum_exp_x * rescale + tl.sum(p * tl.where(col_mask[None, :], x, 0.0), axis=1)
        is_target = (cols[None, :] == target[:, None]) & col_mask[None, :]  # a masked column is no target
        target_x += tl.sum(tl.where(is_target, x, 0.0), axis=1)
        target_hits += tl.sum(is_target.to(tl.int32), axis=1)
        running_max = new_max
    logsumexp = running_max + tl.log(sum_exp)
    logprob = tl.where(target_hits > 0, target_x - logsumexp, float("nan"))
    tl.store(logprobs_ptr + rows, logprob, mask=row_mask)
    tl.store(logsumexp_ptr + rows, logsumexp, mask=row_mask)
    if WITH_ENTROPY:
        # lse - E[x] can round a hair below 0 for a one-hot distribution; entropy is never negative
        entropy = tl.maximum(logsumexp - sum_exp_x / sum_exp, 0.0)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)


def fused_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    with_entropy: bool,
    blocks: tuple[int, int, int] = (BLOCK_N, BLOCK_V, BLOCK_H),
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs [N], logsumexp [N], entropy [N] or empty), fp32, from one kernel launch.

    `blocks` = (BLOCK_N, BLOCK_V, BLOCK_H), powers of two >= 16; tests shrink them so that tiny
    shapes still span several vocabulary tiles and a ragged last tile.
    """
    block_n, block_v, block_h = blocks
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    n, hidden_size = hidden.shape
    logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
    logsumexp = torch.empty_like(logprobs)
    entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logprobs, logsumexp, entropy
    sampled_token_logprobs_kernel[(triton.cdiv(n, block_n),)](
        hidden,
        weight,
        targets,
        logprobs,
        logsumexp,
        entropy if with_entropy else logprobs,  # never written without entropy; any valid pointer
        n,
        weight.shape[0],
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        temperature,
        WITH_ENTROPY=with_entropy,
        UPCAST_DOT=bool(knobs.runtime.interpret),
        ROUND_TO_BF16=hidden.dtype == torch.bfloat16,
        # fp32 operands must not silently become tf32 (torch's fp32 matmul is not tf32 by default);
        # for 16-bit operands the setting does not apply
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 or knobs.runtime.interpret else "tf32",
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        num_warps=8,  # a [64, 128] fp32 tile and its temporaries: 4 warps would spill registers
    )
    return logprobs, logsumexp, entropy
