"""Plain torch decode attention over block tables: the float64 reference every route is tested
against, and the torch SDPA routes (`sdpa`, one call per request; `padded`, one padded batch).

Shapes (all routes): q [batch, q_heads, head_dim]; k_pages, v_pages [pages, kv_heads, page_size,
head_dim]; tables int32 [batch, width]; lengths int32 [batch]. Output float32 [batch, q_heads,
head_dim] (float64 for `reference`). starts: optional int32 [batch], the first token each
request attends to (a sliding-window layer's first visible slot; None = 0), so request b sees
its tokens [starts[b], lengths[b]). Inputs are assumed checked (`kernel.check_inputs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather(pages: torch.Tensor, table: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """One request's tokens [start, n) as a dense [kv_heads, n - start, head_dim] copy (only
    the pages they lie in are read: entries below start's page may be released, -1)."""
    ps = pages.shape[2]
    used = table[start // ps : -(-n // ps)].long().to(pages.device)
    dense = pages.index_select(0, used)  # [n_pages, kv_heads, ps, d]
    lo = start % ps
    return dense.transpose(0, 1).reshape(pages.shape[1], -1, pages.shape[3])[:, lo : lo + n - start]


def _firsts(lengths, starts) -> list[int]:
    return [0] * lengths.shape[0] if starts is None else starts.tolist()


def reference(q, k_pages, v_pages, tables, lengths, scale: float, starts=None) -> torch.Tensor:
    """Exact attention in float64, one request at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    hkv, d = k_pages.shape[1], k_pages.shape[3]
    for b, (n, lo) in enumerate(zip(lengths.tolist(), _firsts(lengths, starts), strict=True)):
        k = gather(k_pages, tables[b], n, lo).double()
        v = gather(v_pages, tables[b], n, lo).double()
        qg = q[b].double().view(hkv, -1, d) * scale  # [kv_heads, group, d]
        w = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, k), dim=-1)
        out[b] = torch.einsum("hgn,hnd->hgd", w, v).reshape(-1, d)
    return out


def sdpa_per_request(
    q, k_pages, v_pages, tables, lengths, scale: float, starts=None
) -> torch.Tensor:
    """Anchor: gather each request's K/V and call torch SDPA on it (GQA), one call per request,
    in the KV dtype (what a HF model's sdpa attention does with a dense cache)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, (n, lo) in enumerate(zip(lengths.tolist(), _firsts(lengths, starts), strict=True)):
        k = gather(k_pages, tables[b], n, lo).unsqueeze(0)
        v = gather(v_pages, tables[b], n, lo).unsqueeze(0)
        qb = q[b : b + 1, :, None].to(k.dtype)
        o = F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True)
        out[b] = o[0, :, 0].float()
    return out


def padded(q, k_pages, v_pages, tables, lengths, scale: float, starts=None) -> torch.Tensor:
    """The coarse padded batch: gather every request into [batch, kv_heads, max_len, d] (pages
    past a request's end are page 0, masked out, as are tokens before its start), then one
    masked SDPA call in the KV dtype."""
    batch, width = tables.shape
    ps, n_max = k_pages.shape[2], int(lengths.max())
    used = -(-n_max // ps)
    idx = tables[:, :used].long().clamp(0, k_pages.shape[0] - 1).reshape(-1)  # unread: masked
    idx = idx.to(k_pages.device)

    def dense(pages):
        x = pages.index_select(0, idx).view(batch, used, pages.shape[1], ps, pages.shape[3])
        return x.transpose(1, 2).reshape(batch, pages.shape[1], used * ps, pages.shape[3])

    k, v = dense(k_pages), dense(v_pages)
    mask = torch.arange(used * ps)[None, :] < lengths[:, None]
    if starts is not None:
        mask &= torch.arange(used * ps)[None, :] >= starts[:, None]
    qb = q[:, :, None].to(k.dtype)
    mask = mask.to(k.device)
    o = F.scaled_dot_product_attention(
        qb, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o[:, :, 0].float()
