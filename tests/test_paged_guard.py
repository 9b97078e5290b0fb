"""The compiled kernel never reads outside the page pool: the pool ends at an inaccessible
(PROT_NONE) page, tables point at the pool's last page with lengths ending exactly there, and
every kernel (scalar, AVX2, AVX-512, AVX512-BF16, AMX where present) runs with the split
settings of every kernel route, on 1 and 2 threads (tasks of all KV heads, or of one), with and
without window starts (a page before the start may point anywhere: it is never read), in a child
process; a read past the end would kill it with SIGSEGV before it prints "ok". Then the child
reads one element past the pool on purpose, to show the guard is there. The child loads the
extension by path (not the spectrumkv package, whose import pulls in transformers)."""

import signal
import subprocess
import sys
import textwrap

from spectrumkv.paged import kernel

CHILD = textwrap.dedent(
    """
    import ctypes, importlib.util, mmap, sys
    import torch

    spec = importlib.util.spec_from_file_location("_attention", sys.argv[1])
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    page, pages, hkv, ps, d = mmap.PAGESIZE, 6, 2, 16, 64
    elems = pages * hkv * ps * d
    nbytes = elems * 2
    total = -(-nbytes // page) * page + page
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pools = []
    for _ in range(2):
        base = libc.mmap(None, total, 3, 0x22, -1, 0)  # PROT_READ|WRITE, PRIVATE|ANONYMOUS
        assert libc.mprotect(base + total - page, page, 0) == 0  # the guard page
        start = base + total - page - nbytes  # the pool ends right at the guard
        buf = (ctypes.c_uint16 * elems).from_address(start)
        t = torch.frombuffer(buf, dtype=torch.bfloat16).view(pages, hkv, ps, d)
        t.copy_(torch.randn(t.shape))
        pools.append(t)
    k, v = pools
    tables = torch.tensor([[5, 4], [4, 5], [5, 0]], dtype=torch.int32)
    lengths = torch.tensor([32, 17, 16], dtype=torch.int32)
    starts_ = torch.tensor([16, 16, 15], dtype=torch.int32)  # the last token of the pool too
    q = torch.randn(3, 8, d)
    out = torch.empty(3, 8, d)
    for isa in range(5):
        ext.set_isa(isa)
        for splits, min_tokens in ((1, 1 << 30), (4, 32), (8, 1), (2, 2048)):
            for b in (slice(0, 3), slice(0, 1), slice(1, 2), slice(2, 3)):  # batch, per request
                qb, ob = q[b].contiguous(), out[b]
                for starts in (b"", starts_[b].numpy()):  # whole, or a window's last tokens
                    for threads in (1, 2):  # tasks of both KV heads, or of one
                        ext.decode(qb.data_ptr(), k.data_ptr(), v.data_ptr(), k.numel(),
                                   tables[b].numpy(), lengths[b].numpy(), ob.data_ptr(), 8, hkv,
                                   d, ps, 2, 0.125, splits, min_tokens, threads, starts)
                        assert torch.isfinite(ob).all()
            # a page wholly before the start is never read: here it points far past the pool
            far = torch.tensor([[1 << 24, 5]], dtype=torch.int32)
            ext.decode(q[:1].contiguous().data_ptr(), k.data_ptr(), v.data_ptr(), k.numel(),
                       far.numpy(), lengths[:1].numpy(), out[:1].data_ptr(), 8, hkv, d, ps, 2,
                       0.125, splits, min_tokens, 2, torch.tensor([16], dtype=torch.int32).numpy())
    print("ok", flush=True)
    print(ctypes.c_uint16.from_address(start + nbytes).value)  # one past the end: faults
    """
)


def test_kernel_reads_stay_inside_the_pool():
    assert kernel.AVAILABLE, "the compiled kernel was not built"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, kernel._attention.__file__], capture_output=True, text=True
    )
    assert run.stdout.strip() == "ok", run.stderr[-2000:]  # every call stayed inside the pool
    assert run.returncode == -signal.SIGSEGV  # then the read past the end hit the guard
