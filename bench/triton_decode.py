"""A Triton split-KV paged decode, after SGLang's algorithm (the baseline of bench/decode.py).

SGLang's decode (python/sglang/srt/layers/attention/triton_ops/decode_attention.py) splits each
request's KV into a fixed number of chunks (one program per (request, KV head, chunk), the GQA group's
query heads padded to 16 rows so tl.dot runs on tensor cores), writes each chunk's (o, lse), then a
second kernel merges the chunks. SGLang indexes tokens (page size 1); this version reads any page
size through the page table: token t of request b lives in page kv_indices[kv_indptr[b] + t // P],
slot t % P. Written for kvattn's benchmark; not SGLang's code.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _stage1(Q, K, V, kv_indptr, kv_indices, kv_lens, MidO, MidL, sm_scale,
            stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
            SPLITS: tl.constexpr, PAGE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_H)
    hmask = rows < GROUP
    heads = kvh * GROUP + rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None], other=0.0)
    page_base = tl.load(kv_indptr + b)
    kv_len = tl.load(kv_lens + b)
    chunk = tl.cdiv(kv_len, SPLITS)
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for s in range(start, end, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        valid = offs < end
        page = tl.load(kv_indices + page_base + offs // PAGE, mask=valid, other=0).to(tl.int64)
        slot = (offs % PAGE).to(tl.int64)
        k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    has = end > start
    o = tl.where(has, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    lse = tl.where(has & (l > 0), m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(MidO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], o,
             mask=hmask[:, None])
    tl.store(MidL + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _stage2(MidO, MidL, Out, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_xb, stride_xh,
            HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    sp = tl.arange(0, SPLITS)
    lse = tl.load(MidL + b * stride_lb + h * stride_lh + sp)
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    o = tl.load(MidO + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + d[None, :])
    tot = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(Out + b * stride_xb + h * stride_xh + d, res.to(Out.dtype.element_ty))


class TritonDecode:
    """plan(kv_indptr, kv_indices, kv_lens, ...) once, run(q, k_cache, v_cache, out) per call.
    k_cache / v_cache: [pages, page_size, kv_heads, head_dim] (NHD)."""

    def __init__(self, num_qo_heads, num_kv_heads, head_dim, page_size, splits=8, block_n=32):
        self.qo, self.kv, self.d, self.page = num_qo_heads, num_kv_heads, head_dim, page_size
        self.group = num_qo_heads // num_kv_heads
        self.splits, self.block_n = splits, block_n
        self.block_h = max(16, triton.next_power_of_2(self.group))

    def plan(self, kv_indptr, kv_indices, kv_lens):
        self.kv_indptr, self.kv_indices, self.kv_lens = kv_indptr, kv_indices, kv_lens
        batch = kv_indptr.numel() - 1
        dev = kv_indices.device
        self.mid_o = torch.empty(batch, self.qo, self.splits, self.d, dtype=torch.float32, device=dev)
        self.mid_l = torch.empty(batch, self.qo, self.splits, dtype=torch.float32, device=dev)
        self.batch = batch

    def run(self, q, k, v, out, sm_scale=None):
        sm_scale = sm_scale or self.d ** -0.5
        if self.batch == 0:
            return out
        _stage1[(self.batch, self.kv, self.splits)](
            q, k, v, self.kv_indptr, self.kv_indices, self.kv_lens, self.mid_o, self.mid_l, sm_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2), self.mid_l.stride(0),
            self.mid_l.stride(1), GROUP=self.group, HEAD_DIM=self.d, BLOCK_H=self.block_h, BLOCK_N=self.block_n,
            SPLITS=self.splits, PAGE=self.page, num_warps=4, num_stages=2)
        _stage2[(self.batch, self.qo)](
            self.mid_o, self.mid_l, out, self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2),
            self.mid_l.stride(0), self.mid_l.stride(1), out.stride(0), out.stride(1), HEAD_DIM=self.d,
            SPLITS=self.splits, num_warps=4)
        return out
