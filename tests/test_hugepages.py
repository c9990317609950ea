"""Host weights moved into transparent huge pages (`toolkit/hugepages.py`): same values, all of them
in one mapping on 2 MiB pages where the kernel offers them, aligned; other devices untouched."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from toolkit.hugepages import ALIGN, HUGE_PAGE, TRIM_BYTES, copy_runs, in_huge_pages, thp_mode


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_weights_move_into_one_huge_page_mapping_with_their_values() -> None:
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 2**32, (2048, 1024), dtype=np.uint32)  # 8 MiB: at least three whole huge pages
    small = rng.standard_normal(3072).astype(np.float16)  # a norm weight, or a GEMV's fp16 scales
    odd = rng.standard_normal((7, 3)).astype(np.float32)  # 84 bytes: the next one must still be aligned
    params = [tvm.runtime.tensor(a) for a in (big, odd, small)]
    out = in_huge_pages(params, tvm.cpu())
    assert out is params  # in place: the old copies are dropped as they are replaced
    for t, ref in zip(out, (big, odd, small)):
        np.testing.assert_array_equal(t.numpy(), ref)
    starts = [np.from_dlpack(t).ctypes.data for t in out]
    assert starts[0] % HUGE_PAGE == 0
    assert all(a % ALIGN == 0 for a in starts)  # TVM's kernels assume 64-byte aligned tensors
    # one after another in one mapping, so the small tensors share the big one's huge pages
    assert starts[1] == starts[0] + big.nbytes and starts[2] == starts[1] + ALIGN
    assert _huge_kib_at(starts[0]) >= 2 * HUGE_PAGE // 1024, "no huge pages behind the weights"


@pytest.mark.parametrize("offset", [0, 64, HUGE_PAGE - 256])
@pytest.mark.parametrize("nbytes", [4 * HUGE_PAGE, 9 * HUGE_PAGE + 37, HUGE_PAGE // 2])
@pytest.mark.parametrize("runs", [2, 3])
def test_parallel_copy_runs_cover_the_tensor_and_never_share_a_huge_page(offset, nbytes, runs) -> None:
    """A large tensor is copied by several threads, each faulting its own huge pages: the runs tile the
    tensor, and every cut falls on a page boundary of the destination."""
    address = 7 * HUGE_PAGE + offset
    got = copy_runs(address, nbytes, runs)
    assert got[0][0] == 0 and got[-1][1] == nbytes
    assert all(a < b for a, b in got) and all(b == c for (_, b), (c, _) in zip(got, got[1:]))
    assert all((address + b) % HUGE_PAGE == 0 for _, b in got[:-1])
    assert len(got) <= runs + (offset != 0)


def test_a_large_tensor_that_starts_mid_page_is_copied_whole() -> None:
    """After a small tensor the next one starts inside a huge page: the parallel copy's head run and its
    odd-sized tail carry the same bytes as the source."""
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    rng = np.random.default_rng(1)
    small = rng.standard_normal(100).astype(np.float32)
    big = rng.integers(0, 256, 9 * HUGE_PAGE + 37, dtype=np.uint8)
    out = in_huge_pages([tvm.runtime.tensor(small), tvm.runtime.tensor(big)], tvm.cpu())
    assert np.from_dlpack(out[1]).ctypes.data % HUGE_PAGE != 0
    np.testing.assert_array_equal(out[0].numpy(), small)
    np.testing.assert_array_equal(out[1].numpy(), big)


def test_dtypes_numpy_cannot_view_stay_where_they_are() -> None:
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    bf16 = tvm.runtime.empty((64,), "bfloat16", tvm.cpu())
    f32 = tvm.runtime.tensor(np.arange(64, dtype=np.float32))
    out = in_huge_pages([bf16, f32], tvm.cpu())
    assert out[0].same_as(bf16)
    np.testing.assert_array_equal(out[1].numpy(), np.arange(64, dtype=np.float32))
    assert np.from_dlpack(out[1]).ctypes.data % HUGE_PAGE == 0


def test_other_devices_and_thp_off_are_left_alone(monkeypatch) -> None:
    import toolkit.hugepages as hp

    t = tvm.runtime.tensor(np.zeros((1024, 1024), np.float32))
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    assert in_huge_pages([t], tvm.cpu())[0].same_as(t)

    class FakeGPU:
        def dlpack_device_type(self) -> int:
            return 2  # kDLCUDA

    monkeypatch.setattr(hp, "thp_mode", lambda: "madvise")
    assert in_huge_pages([t], FakeGPU())[0].same_as(t)


def test_peak_memory_is_the_weights_plus_a_bounded_margin(tmp_path) -> None:
    """Each old copy is freed as it is replaced, and freed heap pages go back to the system as the copies
    proceed: the process's peak grows by the weights plus about TRIM_BYTES, not by the weights twice
    (glibc keeps freed chunks under its mmap threshold, which a freed 32 MiB block raises to 32 MiB, as
    TVM's tensor-cache loader does). A fresh interpreter, so the peak is this case's own."""
    import subprocess
    import sys
    import textwrap

    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    code = textwrap.dedent(
        """
        from toolkit.tvm_compat import tvm_without_torch

        tvm_without_torch()  # a quicker start; torch plays no part here
        import numpy as np, tvm
        from toolkit.hugepages import in_huge_pages

        def peak_mib():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024

        block = np.ones(32 << 20, np.uint8)
        del block  # a freed mmapped chunk: glibc's mmap threshold rises to 32 MiB
        params = [tvm.runtime.tensor(np.full(2 << 20, i, np.uint32)) for i in range(48)]  # 48 x 8 MiB
        before = peak_mib()
        in_huge_pages(params, tvm.cpu())
        assert all(int(np.from_dlpack(t)[0]) == i for i, t in enumerate(params))
        print(peak_mib() - before)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout)
    assert grew <= (TRIM_BYTES >> 20) + 64, f"peak grew {grew} MiB for 384 MiB of weights already in memory"


# -- a weights folder read straight into huge pages (runtime/weights.py) ---------------------------------
def _records(folder, meta):
    """(shard, record) of each parameter, as `load_mlc_params` hands them to the reader."""
    import json

    from toolkit.checkpoint.mlc_format import CACHE_JSON

    shards = json.loads((folder / CACHE_JSON).read_text())["records"]
    where = {r["name"]: (folder / s["dataPath"], r) for s in shards for r in s["records"]}
    return [where[p["name"]] for p in meta]


def _weights_folder(tmp_path):
    from toolkit.checkpoint.mlc_format import write_tensor_cache

    rng = np.random.default_rng(2)
    arrays = {
        "a.q_weight": rng.integers(0, 2**32, (1536, 1024), dtype=np.uint32),  # 6 MiB: split among threads
        "a.q_scale": rng.standard_normal((1536, 32)).astype(np.float16),
        "norm.weight": rng.standard_normal(1000).astype(np.float32),
        "b.q_weight": rng.integers(0, 2**32, (700, 1000), dtype=np.uint32),
    }
    folder = tmp_path / "w"
    write_tensor_cache(arrays.items(), folder, shard_cap=4 << 20)  # several shards, one tensor alone
    meta = [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()]
    return folder, meta[::-1], arrays  # the library's order need not be the folder's


def test_weights_read_from_their_shards_into_huge_pages_equal_tvms_loader(tmp_path) -> None:
    from toolkit.runtime.weights import load_mlc_params

    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    folder, meta, arrays = _weights_folder(tmp_path)
    by_tvm = load_mlc_params(folder, meta, tvm.cpu())
    placed = load_mlc_params(folder, meta, tvm.cpu(), huge_pages=True)
    for p, ref, got in zip(meta, by_tvm, placed):
        np.testing.assert_array_equal(got.numpy(), arrays[p["name"]])
        np.testing.assert_array_equal(ref.numpy(), arrays[p["name"]])
        assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape)
    starts = [np.from_dlpack(t).ctypes.data for t in placed]
    assert starts[0] % HUGE_PAGE == 0 and all(a % ALIGN == 0 for a in starts)
    assert _huge_kib_at(starts[-1]) >= 2 * HUGE_PAGE // 1024, "no huge pages behind the weights"


def test_records_the_reader_cannot_place_go_through_tvms_loader(tmp_path) -> None:
    import json

    from toolkit.checkpoint.mlc_format import CACHE_JSON
    from toolkit.runtime.weights import _read_into_huge_pages

    folder, meta, _ = _weights_folder(tmp_path)
    cache = json.loads((folder / CACHE_JSON).read_text())
    rec = next(r for s in cache["records"] for r in s["records"] if r["name"] == "norm.weight")
    rec["format"] = "f32-to-bf16"  # MLC's encoding: bytes to decode, not to place
    (folder / CACHE_JSON).write_text(json.dumps(cache))
    assert _read_into_huge_pages(_records(folder, meta)) is None


def test_a_shard_shorter_than_its_records_is_one_error(tmp_path) -> None:
    from toolkit.errors import UserError
    from toolkit.runtime.weights import _read_into_huge_pages

    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    folder, meta, _ = _weights_folder(tmp_path)
    shard = max(folder.glob("params_shard_*.bin"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(UserError, match="runs past the end of its shard"):
        _read_into_huge_pages(_records(folder, meta))
