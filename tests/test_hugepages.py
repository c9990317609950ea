"""Host weights moved into transparent huge pages (`toolkit/runtime/hugepages.py`): same values, the large
tensors on 2 MiB pages where the kernel offers them, the small ones and other devices untouched."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from toolkit.runtime.hugepages import HUGE_PAGE, in_huge_pages, thp_mode


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


def test_large_weights_move_to_huge_pages_with_their_values() -> None:
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 2**32, (2048, 1024), dtype=np.uint32)  # 8 MiB: at least three whole huge pages
    small = rng.standard_normal(3072).astype(np.float16)
    params = [tvm.runtime.tensor(big), tvm.runtime.tensor(small)]
    small_before = params[1]
    out = in_huge_pages(params, tvm.cpu())
    assert out is params  # in place: the old copies are dropped as they are replaced
    np.testing.assert_array_equal(out[0].numpy(), big)
    np.testing.assert_array_equal(out[1].numpy(), small)
    assert out[1].same_as(small_before)  # below a huge page: left where it was
    view = np.from_dlpack(out[0])
    assert view.ctypes.data % HUGE_PAGE == 0
    assert _huge_kib_at(view.ctypes.data) >= 2 * HUGE_PAGE // 1024, "no huge pages behind the weight"


def test_other_devices_and_thp_off_are_left_alone(monkeypatch) -> None:
    import toolkit.runtime.hugepages as hp

    t = tvm.runtime.tensor(np.zeros((1024, 1024), np.float32))
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    assert in_huge_pages([t], tvm.cpu())[0].same_as(t)

    class FakeGPU:
        def dlpack_device_type(self) -> int:
            return 2  # kDLCUDA

    monkeypatch.setattr(hp, "thp_mode", lambda: "madvise")
    assert in_huge_pages([t], FakeGPU())[0].same_as(t)
