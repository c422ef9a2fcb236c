"""Triton kernels vs the plain-torch oracle (pagedllm.kernels.torch_ref).

With CUDA the kernels run on the GPU. Without it they run under the Triton interpreter on CPU
tensors: TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here before the
kernel modules are imported, and the modules are reloaded if another test imported them first.
"""

import math
import os
from types import SimpleNamespace

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from pagedllm.kernels import torch_ref  # noqa: E402
from pagedllm.kernels.triton import paged_attention as pa_mod  # noqa: E402
from pagedllm.kernels.triton import qk_rope_store as qk_rope_mod  # noqa: E402
from pagedllm.kernels.triton import rms_norm as rms_norm_mod  # noqa: E402
from pagedllm.layers.attention import QKVLayout, TorchBackend  # noqa: E402
from pagedllm.layers import norm as norm_mod  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.triton_interpreter import interpret, patch_interpreter  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


if not ON_GPU:   # make sure the kernels really run under the interpreter on a CPU-only machine
    interpret(pa_mod, "_paged_attention_kernel")
    interpret(qk_rope_mod, "_qk_rope_store_kernel")
    interpret(rms_norm_mod, "_rms_norm_kernel")
    patch_interpreter()

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}

# (num_heads, num_kv_heads, head_dim, block_size, dtype): SmolLM2-like 9/3x64, Qwen3-like 16/8x128,
# ratio 4 with 32-token blocks, MHA with non-power-of-2 head_dim.
CONFIGS = [
    (9, 3, 64, 16, torch.bfloat16),
    (16, 8, 128, 16, torch.float32),
    (4, 1, 64, 32, torch.float32),
    (4, 4, 96, 16, torch.float16),
]


def _ids(cfg):
    h, kvh, d, bs, dt = cfg
    return f"h{h}-kv{kvh}-d{d}-bs{bs}-{str(dt).split('.')[-1]}"


def _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return k, v


def _block_tables(seq_lens, block_size, num_blocks, gen):
    """Each sequence gets distinct blocks drawn from a shuffled pool; rows padded with unused ids."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    width = max(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    assert sum(need) <= num_blocks
    table = torch.empty(len(seq_lens), width, dtype=torch.int32)
    pos = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[pos:pos + n]
        table[i, n:] = perm[torch.randint(0, num_blocks, (width - n,), generator=gen)]
        pos += n
    return table.to(DEVICE)


def _check(out, ref, dtype, valid_rows=None):
    if valid_rows is not None:
        out, ref = out[valid_rows], ref[valid_rows]
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output"
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOL[dtype])


# (heads, kv heads, head_dim, qk-norm, q/k/v dtype, cache dtype): SmolLM2-like (no norm), Qwen3-like,
# a head_dim whose half is not a power of two, and an fp32 model with a bf16 pool. fp32 checks the
# arithmetic tightly; bf16 rounds three times on the way (as the unfused steps store), and the CPU
# interpreter rounds toward zero where torch rounds to nearest, so bf16 gets a few ulps.
ROPE_STORE = [(9, 3, 64, False, torch.float32, torch.float32), (9, 3, 64, False, torch.bfloat16, torch.bfloat16),
              (16, 8, 128, True, torch.bfloat16, torch.bfloat16), (4, 4, 80, True, torch.float32, torch.float32),
              (4, 2, 64, True, torch.float32, torch.bfloat16)]
ROPE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=2 ** -5)}


@pytest.mark.parametrize("heads,kvh,d,norm,dtype,cache_dtype", ROPE_STORE)
def test_qk_rope_store_equals_the_unfused_steps(heads, kvh, d, norm, dtype, cache_dtype):
    """One kernel == TorchBackend's steps (RMSNorm modules, RotaryEmbedding, torch_ref.store_kv):
    q returned, k and v written to their slots and nowhere else, -1 slots skipped."""
    gen = torch.Generator().manual_seed(heads * d)
    num_blocks, block_size, tokens = 8, 16, 21
    rotary = RotaryEmbedding(SimpleNamespace(rope_theta=1e6), d, 256).to(DEVICE)
    norms = None
    if norm:
        norms = (RMSNorm(d, 1e-6), RMSNorm(d, 1e-6))
        for n in norms:
            n.weight.data = (1 + 0.5 * torch.randn(d, generator=gen)).to(dtype)
        norms = tuple(n.to(DEVICE) for n in norms)
    layout = QKVLayout(heads, kvh, d, rotary, norms)
    qkv = torch.randn(tokens, (heads + 2 * kvh) * d, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, 256, (tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[3, 10, 20]] = -1
    md = SimpleNamespace(slot_mapping=slots.to(DEVICE))
    k_cache, v_cache = _pool(num_blocks, block_size, kvh, d, cache_dtype, gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = TorchBackend().rope_store(qkv, positions, layout, k_ref, v_ref, md)
    q = qk_rope_mod.qk_rope_store(qkv, positions, rotary.cos, rotary.sin,
                                  None if norms is None else (norms[0].weight, norms[1].weight), 1e-6, heads, kvh,
                                  k_cache, v_cache, md.slot_mapping)
    assert q.shape == (tokens, heads, d) and q.dtype == dtype
    torch.testing.assert_close(q.cpu(), q_ref.cpu(), **ROPE_TOL[dtype])
    torch.testing.assert_close(k_cache.cpu(), k_ref.cpu(), **ROPE_TOL[cache_dtype])
    if dtype == cache_dtype:
        assert torch.equal(v_cache, v_ref)
    else:   # one ulp: the interpreter's rounding toward zero
        torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=2 ** -7)


def test_programmatic_dependent_launch_only_on_hopper_or_later():
    """No launch option where PDL cannot run (the CPU interpreter, GPUs before sm90), and never when unwanted."""
    from pagedllm.kernels.triton import pdl
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    if ON_GPU:
        hopper = torch.cuda.get_device_capability()[0] >= 9
        on = {"PDL": True, "launch_pdl": True} if hopper else {"PDL": False}
        assert pdl.launch_options(torch.device("cuda")) == on
        assert pdl.launch_options(torch.device("cuda"), wanted=False) == {"PDL": False}


@pytest.mark.parametrize("hidden,dtype", [(64, torch.float32), (1000, torch.bfloat16), (96, torch.float16)])
def test_rms_norm_equals_torch(hidden, dtype):
    """The kernel == RMSNorm's torch ops, alone and after the residual add (whose sum it returns);
    rows of a strided x (a slice), a hidden size that is not a power of 2."""
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden + 8, generator=gen).to(dtype).to(DEVICE)[:, :hidden]
    residual = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    tol = {**ROPE_TOL, torch.float16: dict(atol=1e-2, rtol=2 ** -8)}[dtype]   # a few ulps (interpreter)
    expected = norm_mod._rms_norm.__wrapped__(x, weight, 1e-6)
    torch.testing.assert_close(rms_norm_mod.rms_norm(x, weight, 1e-6), expected, **tol)
    out, summed = rms_norm_mod.rms_norm(x, weight, 1e-6, residual)
    expected, expected_sum = norm_mod._add_rms_norm.__wrapped__(x, residual, weight, 1e-6)
    assert out.dtype == expected.dtype and summed.dtype == dtype
    torch.testing.assert_close(summed, expected_sum, **tol)
    torch.testing.assert_close(out, expected, **tol)


# Mixed batch: (query tokens, cached prefix). Fresh prefills, chunks on a cached prefix, decodes of
# varied length, a chunk starting mid-block, and an empty sequence (0 query tokens).
MIXED = [(70, 0), (1, 40), (33, 40), (1, 1), (16, 113), (0, 10), (1, 64), (5, 0), (1, 130)]


# fp32 runs the 16-row tile; these bf16 cases cover the 64-row prefill tile for ratios 2 and 4.
MIXED_CONFIGS = CONFIGS + [(16, 8, 128, 16, torch.bfloat16), (8, 2, 128, 32, torch.bfloat16)]


def _mixed_batch(block_size, kvh, d, dtype, gen):
    """The MIXED batch: query lengths, context lengths, pool, block tables, cu_seqlens_q, seq_lens."""
    q_lens = [q for q, _ in MIXED]
    seq_lens = [q + c for q, c in MIXED]
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 7
    k_cache, v_cache = _pool(num_blocks, block_size, kvh, d, dtype, gen)
    tables = _block_tables(seq_lens, block_size, num_blocks, gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q_lens, seq_lens, k_cache, v_cache, tables, cu, lens


@pytest.mark.parametrize("cfg", MIXED_CONFIGS, ids=_ids)
def test_paged_attention_mixed(cfg):
    num_heads, kvh, d, block_size, dtype = cfg
    gen = torch.Generator().manual_seed(1)
    q_lens, seq_lens, k_cache, v_cache, tables, cu, lens = _mixed_batch(block_size, kvh, d, dtype, gen)
    tokens = sum(q_lens)
    # query as a strided view (the q part of a fused qkv tensor)
    qkv = torch.randn(tokens, (num_heads + 2 * kvh) * d, generator=gen).to(dtype).to(DEVICE)
    query = qkv[:, :num_heads * d].view(tokens, num_heads, d)
    scale = d ** -0.5
    out = torch.full((tokens, num_heads, d), float("nan"), dtype=dtype, device=DEVICE)
    result = pa_mod.paged_attention(query, k_cache, v_cache, cu, lens, tables, scale,
                                    max_query_len=max(q_lens), max_seq_len=max(seq_lens), out=out)
    assert result is out
    ref = torch_ref.paged_attention(query.cpu(), k_cache.cpu(), v_cache.cpu(), cu.cpu(), lens.cpu(),
                                    tables.cpu(), scale)
    _check(out, ref, dtype)


@pytest.mark.parametrize("cfg,cascade", [(CONFIGS[0], True), (CONFIGS[1], True), (MIXED_CONFIGS[-1], True),
                                         (CONFIGS[0], False), (MIXED_CONFIGS[-1], False)],
                         ids=lambda p: _ids(p) if isinstance(p, tuple) else ("cascade" if p else "one-split"))
def test_mixed_step_single_tokens_through_decode_kernels(cfg, cascade):
    """How the Triton backend runs a mixed step: the unified kernel skips sequences of one query
    token, and decode_attention fills their rows (query_rows = their cu_seqlens_q entries), two of
    them reading a shared two-block prefix through a cascade tile (or, without it, in one split:
    max_model_len 256)."""
    num_heads, kvh, d, block_size, dtype = cfg
    gen = torch.Generator().manual_seed(6)
    q_lens, seq_lens, k_cache, v_cache, tables, cu, lens = _mixed_batch(block_size, kvh, d, dtype, gen)
    tables[8, :2] = tables[6, :2]                # sequences 6 and 8 share their first two blocks
    single_lens = torch.tensor([n if q == 1 else 0 for q, n in zip(q_lens, seq_lens)], dtype=torch.int32,
                               device=DEVICE)
    tile_size = pa_mod.shared_tile_seqs(num_heads, kvh)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    shared = dict(shared_lens=as_tensor([2 * block_size if i in (6, 8) else 0 for i in range(len(MIXED))]),
                  tile_seqs=as_tensor([[6, 8] + [-1] * (tile_size - 2)]), tile_lens=as_tensor([2 * block_size]))
    tokens = sum(q_lens)
    query = torch.randn(tokens, num_heads, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    out = torch.full((tokens, num_heads, d), float("nan"), dtype=dtype, device=DEVICE)
    pa_mod.paged_attention(query, k_cache, v_cache, cu, lens, tables, scale, max_query_len=max(q_lens),
                           max_seq_len=max(seq_lens), out=out, skip_single_token=True)
    single_rows = cu[:-1][single_lens > 0].long()
    assert out[single_rows].isnan().all()       # left for the decode kernels
    pa_mod.decode_attention(query, k_cache, v_cache, single_lens, tables, scale, 1024 if cascade else 256,
                            out=out, query_rows=cu[:-1], **(shared if cascade else {}))
    ref = torch_ref.paged_attention(query.cpu(), k_cache.cpu(), v_cache.cpu(), cu.cpu(), lens.cpu(),
                                    tables.cpu(), scale)
    _check(out, ref, dtype)


DECODE_LENS = [1, 15, 16, 17, 63, 64, 65, 200, 257, 600, 0, 129]


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=_ids)
def test_paged_attention_decode_only(cfg):
    """Pure decode batch through the mixed kernel (small-tile path)."""
    num_heads, kvh, d, block_size, dtype = cfg
    gen = torch.Generator().manual_seed(2)
    seq_lens = [n for n in DECODE_LENS if n > 0]
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 3
    k_cache, v_cache = _pool(num_blocks, block_size, kvh, d, dtype, gen)
    tables = _block_tables(seq_lens, block_size, num_blocks, gen)
    batch = len(seq_lens)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(batch, num_heads, d, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    pa_mod.paged_attention(query, k_cache, v_cache, cu, lens, tables, d ** -0.5,
                           max_query_len=1, max_seq_len=max(seq_lens), out=out)
    ref = torch_ref.paged_attention(query.cpu(), k_cache.cpu(), v_cache.cpu(), cu.cpu(), lens.cpu(),
                                    tables.cpu(), d ** -0.5)
    _check(out, ref, dtype)


@pytest.mark.parametrize("cfg,max_model_len,copies", [(cfg, 1024, 1) for cfg in CONFIGS] + [
    (CONFIGS[0], 8192, 1), (CONFIGS[2], 8192, 1), (CONFIGS[0], 256, 1), (CONFIGS[2], 256, 1), (CONFIGS[1], 1024, 2)],
    ids=lambda p: _ids(p) if isinstance(p, tuple) else f"{p}")
def test_decode_attention(cfg, max_model_len, copies):
    """Split-K decode: lengths around tile/block edges and crossing split boundaries (max_model_len
    1024 caps the split count at 4; 8192 allows 32: 15 resp. 32 splits for the two configs run with
    it; 256 gives one split), plus a padding row with seq_len 0 that must come out as zeros. Two
    copies of the lengths with 8 KV heads make enough sequences for the 128-position tile."""
    num_heads, kvh, d, block_size, dtype = cfg
    gen = torch.Generator().manual_seed(3)
    seq_lens = DECODE_LENS * copies
    assert (pa_mod._decode_config(len(seq_lens), kvh, False, torch.device(DEVICE))["block_n"] == 128) == (copies == 2)
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 5
    k_cache, v_cache = _pool(num_blocks, block_size, kvh, d, dtype, gen)
    tables = _block_tables([max(n, 1) for n in seq_lens], block_size, num_blocks, gen)
    batch = len(seq_lens)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(batch, num_heads, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    out = torch.full_like(query, float("nan"))
    result = pa_mod.decode_attention(query, k_cache, v_cache, lens, tables, scale, max_model_len, out=out)
    assert result is out
    valid = [i for i, n in enumerate(seq_lens) if n > 0]
    cu = torch.arange(len(valid) + 1, dtype=torch.int32)
    ref = torch_ref.paged_attention(query[valid].cpu(), k_cache.cpu(), v_cache.cpu(), cu, lens[valid].cpu(),
                                    tables[valid].cpu(), scale)
    _check(out[valid], ref, dtype)
    padding = [i for i, n in enumerate(seq_lens) if n == 0]
    assert (out[padding] == 0).all()


@pytest.mark.parametrize("cfg,heads,max_model_len", [(CONFIGS[0], 4, 1024), (CONFIGS[2], 4, 1024)],
                         ids=lambda p: _ids(p) if isinstance(p, tuple) else f"{p}")
def test_decode_reduce_with_several_heads_a_program(monkeypatch, cfg, heads, max_model_len):
    """The reduce kernel's programs taking several heads (the last program of 9 heads in fours
    holding one; a KV head of 4 query heads in one), plain and after cascade tiles; _reduce_heads picks 1 for
    these small batches."""
    monkeypatch.setattr(pa_mod, "_reduce_heads", lambda *args: heads)
    test_decode_attention(cfg, max_model_len, 1)
    test_decode_attention_shared_prefix(cfg)


def test_reduce_heads_fill_the_sms_in_one_wave():
    dev = torch.device(DEVICE)
    sms = pa_mod._num_sms(dev)
    assert pa_mod._reduce_heads(1, 16, 64, dev) == 1
    assert pa_mod._reduce_heads(256, 16, 2, dev) == (16 if 256 >= sms else 8)
    for batch, slots in [(48, 8), (128, 4), (256, 2), (8, 16)]:
        heads = pa_mod._reduce_heads(batch, 16, slots, dev)
        assert heads * slots <= pa_mod._REDUCE_TILE_SLOTS
        assert heads == 1 or batch * 16 // heads >= sms


def test_decode_split_count_depends_on_shapes_only():
    """CUDA-graph safety: the split count comes from batch, kv heads and max_model_len alone."""
    dev = torch.device(DEVICE)
    assert pa_mod._num_splits(1, 8, 40960, dev) == pa_mod._MAX_SPLITS
    assert pa_mod._num_splits(256, 8, 40960, dev) == 2
    assert pa_mod._num_splits(1024, 8, 40960, dev) == 1
    assert pa_mod._num_splits(1, 8, 300, dev) == 2


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2]], ids=_ids)
def test_decode_attention_shared_prefix(cfg):
    """Cascade decode: sequences whose tables start with the same blocks read them through shared-
    prefix tiles. Groups larger than a tile, a member whose whole context is the shared prefix,
    sequences in no tile, an unused (length 0) tile and a padding row; equal to the plain oracle."""
    num_heads, kvh, d, block_size, dtype = cfg
    gen = torch.Generator().manual_seed(5)
    tile_size = pa_mod.shared_tile_seqs(num_heads, kvh)
    # (shared blocks, [own tokens after the prefix per member])
    groups = [(3, [1, 17, 40] + [5] * tile_size), (6, [0, 70, 130])]
    alone = [33, 0, 300]
    seq_lens, shared, tables = [], [], []
    num_blocks = 200 + tile_size * 4
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tile_seqs, tile_lens = [], []
    for prefix_blocks, own in groups:
        prefix = [perm.pop() for _ in range(prefix_blocks)]
        members = []
        for extra in own:
            n = prefix_blocks * block_size + extra
            members.append(len(seq_lens))
            seq_lens.append(n)
            shared.append(prefix_blocks * block_size)
            tables.append(prefix + [perm.pop() for _ in range(math.ceil(extra / block_size))])
        for i in range(0, len(members), tile_size):
            chunk = members[i:i + tile_size]
            tile_seqs.append(chunk + [-1] * (tile_size - len(chunk)))
            tile_lens.append(prefix_blocks * block_size)
    for n in alone:
        seq_lens.append(n)
        shared.append(0)
        tables.append([perm.pop() for _ in range(max(1, math.ceil(n / block_size)))])
    tile_seqs.append([-1] * tile_size)      # an unused tile, as CUDA graphs pad them
    tile_lens.append(0)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = _pool(num_blocks, block_size, kvh, d, dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(seq_lens), num_heads, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    out = torch.full_like(query, float("nan"))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    pa_mod.decode_attention(query, k_cache, v_cache, lens, table, scale, 1024, out=out,
                            shared_lens=as_tensor(shared), tile_seqs=as_tensor(tile_seqs),
                            tile_lens=as_tensor(tile_lens))
    valid = [i for i, n in enumerate(seq_lens) if n > 0]
    cu = torch.arange(len(valid) + 1, dtype=torch.int32)
    ref = torch_ref.paged_attention(query[valid].cpu(), k_cache.cpu(), v_cache.cpu(), cu, lens[valid].cpu(),
                                    table[valid].cpu(), scale)
    _check(out[valid], ref, dtype)
    assert (out[[i for i, n in enumerate(seq_lens) if n == 0]] == 0).all()
