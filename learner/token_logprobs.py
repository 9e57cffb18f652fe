"""Log-probs (and entropy) of the sampled tokens straight from the LM head, without [N, V] logits.

Why. The naive path (learner/logprobs.py) asks the model for its logits, [B, T, V] in the model's
dtype, then takes an fp32 log_softmax of all of them: for N tokens that is N * V * (2 + 4 + 4)
bytes alive at once (bf16 logits, the fp32 copy, the fp32 log_softmax autograd keeps for the
backward), e.g. 8k tokens of a 150k-vocab model: 2.5 GB + 4.9 GB + 4.9 GB. Only one number per
token is needed. Here the logits are made `chunk_tokens` tokens at a time and dropped at once; the
forward keeps hidden, weight, targets and one logsumexp per token, the backward recomputes each
chunk's logits. Peak extra memory: a few [chunk_tokens, V] fp32 buffers, whatever N is.

What it computes, per token i (the quantity vLLM reports as a "processed" logprob):

    z_i = hidden_i @ weight.T         in the input dtype (bf16 stays bf16, as the model's lm_head)
    x_i = z_i.float() / temperature   fp32 from here on
    logprob_i = x_i[target_i] - logsumexp(x_i),   entropy_i = -sum_j p_ij log p_ij,  p_i = softmax(x_i)

Backward. With upstream gradient g_i = dL/dlogprob_i:

    dL/dz_ij = g_i * (onehot(target_i)_j - p_ij) / temperature        (p_i from the saved logsumexp)
    grad_hidden_i = sum_j dL/dz_ij weight_j,   grad_weight_j = sum_i dL/dz_ij hidden_i

dL/dz is cast to the input dtype before both matmuls, as autograd through `.float()` does; the
weight gradient (only when `weight.requires_grad`, full-weight training) is summed over chunks in
fp32 and cast once at the end. Entropy is a metric: it carries no gradient.

Backends: "torch" (chunked, any device) or "triton" (learner/triton_token_logprobs.py: one fused
kernel for the forward; the backward is the same chunked recompute, see that module for why).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "triton"]


def sampled_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor | None]:
    """log_softmax((hidden @ weight.T).float() / temperature)[i, targets[i]] and its entropy.

    hidden [N, H] (the final hidden states of the N scored tokens, padding already dropped),
    weight [V, H] (the LM head, no bias; under ZeRO-3 the caller passes it gathered), targets [N]
    long. Returns (logprobs [N] float32 with grad to hidden and, if it requires grad, weight;
    entropy [N] float32 without grad, or None when `with_entropy` is False).
    `chunk_tokens` bounds the torch backend's (and every backward's) [chunk, V] buffers.
    "auto" uses Triton for CUDA tensors when triton imports, else the torch backend.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(
            f"targets must be a long tensor [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype:
        # The matmul runs in one dtype; a silent upcast would change the logits vLLM is compared with.
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not temperature > 0 or chunk_tokens < 1:
        raise ValueError(f"temperature > 0 and chunk_tokens >= 1 needed, got {temperature}, {chunk_tokens}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton_available() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    logprobs, entropy = SampledTokenLogprobs.apply(
        hidden, weight, targets, float(temperature), chunk_tokens, with_entropy, backend
    )
    return logprobs, (entropy if with_entropy else None)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tempered_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """fp32 [n, V] logits / temperature, the matmul in the input dtype: what the naive path makes."""
    return (hidden @ weight.T).float().div_(temperature)


def chunked_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_tokens: int, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs [N], logsumexp [N], entropy [N] or empty) in fp32, one [chunk, V] block at a time."""
    n = hidden.shape[0]
    logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
    logsumexp = torch.empty_like(logprobs)
    entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        x = tempered_logits(hidden[rows], weight, temperature)
        lse = torch.logsumexp(x, dim=-1)
        log_p = x.sub_(lse[:, None])  # in place: the chunk's only [chunk, V] fp32 buffer
        logprobs[rows] = log_p.gather(1, targets[rows, None]).squeeze(1)
        logsumexp[rows] = lse
        if with_entropy:
            entropy[rows] = -(log_p.exp() * log_p).sum(-1)
    return logprobs, logsumexp, entropy


def chunked_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    logsumexp: Tensor,
    grad_logprobs: Tensor,
    temperature: float,
    chunk_tokens: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_hidden, grad_weight) from the recomputed logits of each chunk; see the module docstring."""
    grad_hidden = torch.empty_like(hidden) if needs_grad_hidden else None
    # fp32 sum over chunks: a bf16 running sum would round once per chunk.
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad_weight else None
    )
    grad_logprobs = grad_logprobs.float()
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        # softmax from the saved logsumexp: no second reduction over the vocabulary
        grad_x = tempered_logits(hidden[rows], weight, temperature).sub_(logsumexp[rows, None]).exp_().neg_()
        grad_x.scatter_add_(1, targets[rows, None], torch.ones_like(grad_x[:, :1]))  # onehot - p
        grad_z = grad_x.mul_(grad_logprobs[rows, None] / temperature).to(hidden.dtype)
        del grad_x
        if grad_hidden is not None:
            torch.mm(grad_z, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.add_(grad_z.T @ hidden[rows])
    return grad_hidden, (None if grad_weight is None else grad_weight.to(weight.dtype))


class SampledTokenLogprobs(torch.autograd.Function):
    """Saves hidden, weight, targets and the per-token logsumexp only; never the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens, with_entropy, backend):
        if backend == "triton":
            from learner.triton_token_logprobs import fused_forward

            logprobs, logsumexp, entropy = fused_forward(hidden, weight, targets, temperature, with_entropy)
        else:
            logprobs, logsumexp, entropy = chunked_forward(
                hidden, weight, targets, temperature, chunk_tokens, with_entropy
            )
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        grad_hidden, grad_weight = chunked_backward(
            hidden,
            weight,
            targets,
            logsumexp,
            grad_logprobs,
            ctx.temperature,
            ctx.chunk_tokens,
            needs_grad_hidden=ctx.needs_input_grad[0],
            needs_grad_weight=ctx.needs_input_grad[1],
        )
        return grad_hidden, grad_weight, None, None, None, None, None
