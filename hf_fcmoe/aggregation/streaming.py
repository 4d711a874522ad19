"""Cache-sized chunked kernels over the factors of M states of one LoRA pair. Pure torch.

``sources`` is always a list of M tensors of one key: the global first, then the N clients. The kernels
compute Gram matrices and linear combinations of those factors chunk by chunk, so no client delta, no
stacked copy and no expert-major copy of a full tensor is ever formed: each source is read once per call,
the per-chunk scratch (~2 MB) is allocated once per call and reused, and float32 accumulation happens on
data that is still in cache.

PEFT layout (see `hf_fcmoe.adapters.layout`): ``A`` is (E*r, in) with expert e in rows ``e*r:(e+1)*r``; ``B`` is
(out, E*r) with rank k of expert e in column ``k*E + e``. Inputs of other float dtypes are converted chunk by
chunk to float32 before any arithmetic.

The kernels use torch's thread setting as they find it. Forcing them onto one thread (tried) helped on a
machine whose cores other processes held, but on a quiet 2-core machine the per-call thread switching made
fcmoe factor mode 4.6x fedavg instead of 2.9x: a process sharing its cores should lower its thread count
once (`torch.set_num_threads`), not per kernel. Only the batched small LAPACK solve of exact mode switches
to one thread (`lowrank.single_threaded`), once per round.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 2 << 20


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _b_view(tensor: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(rows, E*r) -> (E, rows, r) view (column k*E + e is [e, :, k])."""
    return tensor.reshape(tensor.shape[0], -1, num_experts).permute(2, 0, 1)


def _a_view(tensor: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E*r, cols) -> (E, r, cols) view."""
    return tensor.reshape(num_experts, -1, tensor.shape[-1])


def _step(bytes_per_unit: int) -> int:
    return max(1, CHUNK_BYTES // max(1, bytes_per_unit))


def delta_gram(b_sources: list[torch.Tensor], a_sources: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """(E, N, N) float64 factor-space inner products of the client deltas ``[B_n - B_g; A_n - A_g]`` per expert.

    The subtraction is fused into the chunked Gram: each chunk of deltas lives only in a reusable buffer.
    """
    experts = num_experts
    g_b, clients_b = b_sources[0], b_sources[1:]
    g_a, clients_a = a_sources[0], a_sources[1:]
    num = len(clients_b)
    out_features, width = g_b.shape
    rank = width // experts
    in_features = g_a.shape[1]
    gram = torch.zeros(experts, num, num, dtype=torch.float64)
    rows = min(out_features, _step(4 * experts * num * rank))
    cols = min(in_features, _step(4 * experts * num * rank))
    scratch = torch.empty(experts * num * rank * max(rows, cols))
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        span = stop - start
        buf = scratch[: experts * num * span * rank].view(experts, num, span * rank)
        base = _b_view(_f32(g_b[start:stop]), experts)
        for n, tensor in enumerate(clients_b):
            torch.sub(_b_view(_f32(tensor[start:stop]), experts), base, out=buf[:, n].view(experts, span, rank))
        gram += torch.bmm(buf, buf.transpose(1, 2))
    for start in range(0, in_features, cols):
        stop = min(in_features, start + cols)
        span = stop - start
        buf = scratch[: experts * num * rank * span].view(experts, num, rank, span)
        base = _a_view(_f32(g_a[:, start:stop]), experts)
        for n, tensor in enumerate(clients_a):
            torch.sub(_a_view(_f32(tensor[:, start:stop]), experts), base, out=buf[:, n])
        flat = buf.view(experts, num, rank * span)
        gram += torch.bmm(flat, flat.transpose(1, 2))
    return gram


def _expert_vectors(coef: torch.Tensor, rank: int, kind: str) -> torch.Tensor:
    """(..., E) per-expert coefficients -> broadcastable over a factor's rows ("a") or columns ("b")."""
    if kind == "b":  # column k*E + e carries expert e: the coefficient vector tiles over ranks
        return coef.float().repeat(*([1] * (coef.dim() - 1)), rank).unsqueeze(-2)  # (..., 1, E*r)
    return coef.float().repeat_interleave(rank, dim=-1).unsqueeze(-1)  # row e*r + k carries expert e: (..., E*r, 1)


def combine(
    sources: list[torch.Tensor],
    coef: torch.Tensor,
    num_experts: int,
    kind: str,
    dtype: torch.dtype,
    derived: torch.Tensor | None = None,
):
    """Per-expert linear combinations of the sources, one output per row of ``coef``.

    ``coef`` is (O, M, E): output o's expert e is ``sum_m coef[o, m, e] * source_m[expert e]``; ``kind`` is
    ``"a"`` or ``"b"`` (which factor the sources are). Returns O tensors shaped like the sources, in ``dtype``.
    Sources whose coefficients are all zero for an output are skipped.

    ``derived`` (D, E), optional: D more outputs ``derived[d, e] * (output_0 - source_0)`` per expert, taken
    from output 0's float32 chunk while it is in cache, so they cost a write but no further read of the
    sources (FC-MoE's residuals are such multiples of the merged update). They follow the O outputs.
    """
    count = coef.shape[0] + (0 if derived is None else derived.shape[0])
    outputs = [torch.empty(sources[0].shape, dtype=dtype) for _ in range(count)]
    rank = sources[0].shape[1 if kind == "b" else 0] // num_experts
    vectors = _expert_vectors(coef, rank, kind)  # (O, M, 1, E*r) or (O, M, E*r, 1)
    scales = None if derived is None else _expert_vectors(derived, rank, kind)
    total, unit = sources[0].shape
    used = coef.abs().sum(-1) > 0  # (O, M)
    used[:, 0] = True
    step = min(total, _step(4 * unit))
    temp = None if dtype == torch.float32 else torch.empty(step, unit)
    delta = None if derived is None else torch.empty(step, unit)
    for start in range(0, total, step):
        stop = min(total, start + step)
        chunks = [_f32(src[start:stop]) for src in sources]
        for o in range(coef.shape[0]):
            output = outputs[o]
            acc = output[start:stop] if temp is None else temp[: stop - start]
            vec = vectors[o] if kind == "b" else vectors[o][:, start:stop]
            torch.mul(chunks[0], vec[0], out=acc)
            for m in range(1, len(sources)):
                if used[o, m]:
                    acc.addcmul_(chunks[m], vec[m])
            if temp is not None:
                output[start:stop].copy_(acc)
            if o == 0 and scales is not None:
                diff = torch.sub(acc, chunks[0], out=delta[: stop - start])
                for d in range(scales.shape[0]):
                    scale = scales[d] if kind == "b" else scales[d][start:stop]
                    torch.mul(diff, scale, out=outputs[coef.shape[0] + d][start:stop])
    return outputs


def _stacked_b_chunks(b_sources: list[torch.Tensor], experts: int, rows: int, scratch: torch.Tensor):
    """Yield ``(start, span, X_B rows)``: (E, span, M*r) source-major stacked B rows, chunk by chunk in `scratch`."""
    out_features, width = b_sources[0].shape
    num, rank = len(b_sources), width // experts
    for start in range(0, out_features, rows):
        span = min(out_features, start + rows) - start
        buf = scratch[: experts * span * num * rank].view(experts, span, num, rank)
        for m, tensor in enumerate(b_sources):
            buf[:, :, m].copy_(_b_view(tensor[start : start + span], experts))
        yield start, span, buf.view(experts, span, num * rank)


def _stacked_a_chunks(a_sources: list[torch.Tensor], experts: int, cols: int, scratch: torch.Tensor):
    """Yield ``(start, span, X_A columns)``: (E, M*r, span) source-major stacked A columns, chunk by chunk."""
    in_features = a_sources[0].shape[1]
    num, rank = len(a_sources), a_sources[0].shape[0] // experts
    for start in range(0, in_features, cols):
        span = min(in_features, start + cols) - start
        buf = scratch[: experts * num * rank * span].view(experts, num, rank, span)
        for m, tensor in enumerate(a_sources):
            buf[:, m].copy_(_a_view(tensor[:, start : start + span], experts))
        yield start, span, buf.view(experts, num * rank, span)


def stacked_grams(
    b_sources: list[torch.Tensor], a_sources: list[torch.Tensor], num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """G_B = X_B^T X_B and G_A = X_A X_A^T (E, K, K) float64 of the stacked factors (K = M r, source-major).

    Same result as `lowrank.gram_matrices(*lowrank.stack_factors(...))`, accumulated chunk by chunk.
    """
    experts, num = num_experts, len(b_sources)
    out_features, width = b_sources[0].shape
    rank = width // experts
    size = num * rank
    in_features = a_sources[0].shape[1]
    gram_b = torch.zeros(experts, size, size, dtype=torch.float64)
    gram_a = torch.zeros(experts, size, size, dtype=torch.float64)
    rows = min(out_features, _step(4 * experts * size))
    cols = min(in_features, _step(4 * experts * size))
    scratch = torch.empty(experts * size * max(rows, cols))
    for _, _, flat in _stacked_b_chunks(b_sources, experts, rows, scratch):
        gram_b += torch.bmm(flat.transpose(1, 2), flat)
    for _, _, flat in _stacked_a_chunks(a_sources, experts, cols, scratch):
        gram_a += torch.bmm(flat, flat.transpose(1, 2))
    return gram_b, gram_a


def stacked_apply(
    b_sources: list[torch.Tensor],
    a_sources: list[torch.Tensor],
    num_experts: int,
    t_b: torch.Tensor,
    t_a: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New factors ``B_o = X_B @ t_b[..., o-th r columns]`` and ``A_o = t_a[:, o-th r rows] @ X_A`` per expert.

    ``t_b`` is (E, K, O*r), ``t_a`` (E, O*r, K); returns O PEFT-layout B tensors (out, E*r) and O A tensors
    (E*r, in) in ``dtype``: the merged factors (o = 0) and any factor-space residuals share one pass.
    """
    experts, num = num_experts, len(b_sources)
    out_features, width = b_sources[0].shape
    rank = width // experts
    size = num * rank
    in_features = a_sources[0].shape[1]
    count = t_b.shape[-1] // rank
    t_b, t_a = t_b.float(), t_a.float()
    new_b = [torch.empty(out_features, width, dtype=dtype) for _ in range(count)]
    new_a = [torch.empty(experts * rank, in_features, dtype=dtype) for _ in range(count)]
    rows = min(out_features, _step(4 * experts * size))
    cols = min(in_features, _step(4 * experts * size))
    scratch = torch.empty(experts * size * max(rows, cols))
    for start, span, flat in _stacked_b_chunks(b_sources, experts, rows, scratch):
        result = torch.bmm(flat, t_b)  # (E, span, O*r)
        for o, tensor in enumerate(new_b):
            _b_view(tensor[start : start + span], experts).copy_(result[:, :, o * rank : (o + 1) * rank])
    for start, span, flat in _stacked_a_chunks(a_sources, experts, cols, scratch):
        result = torch.bmm(t_a, flat)  # (E, O*r, span)
        for o, tensor in enumerate(new_a):
            _a_view(tensor, experts)[:, :, start : start + span].copy_(result[:, o * rank : (o + 1) * rank])
    return new_b, new_a
