"""decode.py - batch decode over a paged KV cache with the kvattn Python binding (NumPy, CPU).

Three requests of 7, 1 and 20 cached tokens live in pages of 4 tokens, scattered over the cache;
8 query heads share 2 KV heads (GQA, group size 4). kvattn computes one decode step; a few lines of
NumPy compute the same thing and the two are compared.

Run after `make`:  PYTHONPATH=python python3 examples/decode.py
or after `pip install ./python` (with KVATTN_LIBRARY=/path/to/libkvattn.so if it is not installed).
"""
import numpy as np

import kvattn

num_qo_heads, num_kv_heads, head_dim, page_size = 8, 2, 64, 4
kv_lens = [7, 1, 20]
rng = np.random.default_rng(0)

# Page tables, as serving systems keep them: request i owns pages
# kv_indices[kv_indptr[i]:kv_indptr[i+1]]; its last page holds kv_last_page_len[i] tokens.
pages_per_request = [(n + page_size - 1) // page_size for n in kv_lens]
kv_indptr = np.cumsum([0] + pages_per_request).astype(np.int32)
num_pages = int(kv_indptr[-1])
kv_indices = rng.permutation(num_pages).astype(np.int32)
kv_last_page_len = np.array([(n - 1) % page_size + 1 for n in kv_lens], dtype=np.int32)

# The cache, NHD layout: [pages, page_size, kv_heads, head_dim]; one query token per request.
k_cache = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim), dtype=np.float32)
v_cache = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim), dtype=np.float32)
q = rng.standard_normal((len(kv_lens), num_qo_heads, head_dim), dtype=np.float32)

decode = kvattn.BatchDecodeWithPagedKVCacheWrapper("cpu", "NHD")
decode.plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
            page_size, q_data_type="float32")                      # once per batch
out, lse = decode.run(q, (k_cache, v_cache), return_lse=True)      # once per layer

# The same in NumPy: gather each request's tokens from its pages, softmax over them.
group = num_qo_heads // num_kv_heads
worst = 0.0
for i, n in enumerate(kv_lens):
    pages = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
    k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n]    # [n, kv_heads, head_dim]
    v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head h reads KV head h // group
    s = np.einsum("hd,nhd->hn", q[i], k) / np.sqrt(head_dim)
    ref_lse = s.max(axis=1) + np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1))  # natural log
    ref = np.einsum("hn,nhd->hd", np.exp(s - ref_lse[:, None]), v)
    worst = max(worst, float(np.abs(out[i] - ref).max()), float(np.abs(lse[i] - ref_lse).max()))

print("kvattn %s (%s): decode of %d requests, max abs difference to NumPy %.2e"
      % (kvattn.__version__, kvattn.library_path, len(kv_lens), worst))
if worst > 1e-4:
    raise SystemExit("decode.py: WRONG result")
print("decode.py: ok")
