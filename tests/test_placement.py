"""Memory plan of the resident merger and the precomputed magnitude index behind exact TIES cuts."""

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.materialize.placement import plan_memory
from evomerge.methods.magnitude_index import MagnitudeIndex, high_half
from evomerge.methods.sparsify import RankCut

GB = 10**9


@pytest.mark.parametrize("device,free,want", [
    ("cuda", (80 * GB, 200 * GB), "device"),   # 3 x 14 GB pool + live + workspace fit an 80 GB card
    ("cuda", (40 * GB, 200 * GB), "host"),     # they do not; the pool fits pinned host memory
    ("cuda", (40 * GB, 30 * GB), "disk"),      # neither
    ("cpu", (96 * GB, 96 * GB), "device"),
    ("cpu", (40 * GB, 40 * GB), "disk"),
])
def test_auto_placement_takes_the_first_that_fits(device, free, want):
    plan = plan_memory(42 * GB, 14 * GB, 1 * GB, device, free=free)
    assert plan.placement == want
    assert want in plan.describe() and "42.00 GB" in plan.describe()


def test_forced_placements_and_bad_names():
    assert plan_memory(42 * GB, 14 * GB, GB, "cuda", "disk", free=(80 * GB, 200 * GB)).placement == "disk"
    host_on_cpu = plan_memory(GB, GB, GB, "cpu", "host", free=(64 * GB, 64 * GB))
    assert host_on_cpu.placement == "device" and "host memory is the device memory" in host_on_cpu.reason
    with pytest.raises(EvomergeError, match="choose one of auto, device, host, disk"):
        plan_memory(GB, GB, GB, "cpu", "gpu")
    # a forced placement that does not fit is taken, and says so
    forced = plan_memory(60 * GB, 15 * GB, 2 * GB, "cuda", "device", free=(20 * GB, 120 * GB))
    assert forced.placement == "device" and "needs more than the free memory" in forced.describe()
    assert plan_memory(42 * GB, 14 * GB, GB, "cuda", "disk", free=(80 * GB, 200 * GB)).reason == "as requested"


def test_every_placement_holds_the_live_model_and_workers_share_the_host():
    # host and disk still put the live model and the workspace on the device: 17 GB do not fit in 8
    with pytest.raises(EvomergeError, match=r"the live model \(15.00 GB\) and the merge workspace \(2.00 GB\) "
                                            r"alone need more than 85% of the 8.00 GB free on the cuda"):
        plan_memory(60 * GB, 15 * GB, 2 * GB, "cuda", free=(8 * GB, 120 * GB))
    # two CPU workers starting together on 20 GB: each plans with 10 GB, so an 11 GB plan goes to disk
    alone = plan_memory(8 * GB, 2 * GB, GB, "cpu", free=(20 * GB, 20 * GB))
    shared = plan_memory(8 * GB, 2 * GB, GB, "cpu", free=(20 * GB, 20 * GB), sharing=2)
    assert alone.placement == "device" and shared.placement == "disk"
    assert "10.00 GB free on the device, 10.00 GB on the host (a 1/2 share per worker)" in shared.describe()
    # each worker has its own GPU, but they split the host's pinned memory
    assert plan_memory(42 * GB, 14 * GB, GB, "cuda", free=(40 * GB, 100 * GB), sharing=2).placement == "host"
    assert plan_memory(42 * GB, 14 * GB, GB, "cuda", free=(40 * GB, 100 * GB), sharing=3).placement == "disk"


def test_index_cuts_equal_rank_cuts_including_ties_and_edges():
    torch.manual_seed(0)
    sizes = [7, 100, 40_000, 1, 3_000, 70_000]
    parts = [torch.randn(n) for n in sizes]
    parts[4] = parts[4].to(torch.bfloat16).float()  # few distinct values: ties at most cuts
    parts[2][:5000] = 0.5
    magnitude = torch.cat(parts).abs()
    index = MagnitudeIndex(high_half(magnitude), sizes)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    gen = torch.Generator().manual_seed(1)
    ks_list = [[0] * 6, list(sizes)] + [[int(torch.randint(0, n + 1, (1,), generator=gen)) for n in sizes]
                                        for _ in range(30)]
    ks_list.append([n - 1 for n in sizes])
    ks_list.append([35_000 + 1, 50, 37_000, 1, 1_500, 2])  # 37_000 cuts inside the run of 0.5s
    for ks in ks_list:
        ks = [min(k, n) for k, n in zip(ks, sizes)]
        got = index.trim_(magnitude.clone(), ks)
        for (a, b), k in zip(zip(starts, starts[1:]), ks):
            want = RankCut(magnitude[a:b], k).apply_(magnitude[a:b].clone())
            assert torch.equal(got[a:b], want), (ks, a)
            assert int((got[a:b] != 0).sum()) == min(k, int((magnitude[a:b] != 0).sum()))


def test_index_is_small_next_to_the_tensors_it_indexes():
    torch.manual_seed(0)
    sizes = [4096 * 1024, 1024 * 1024, 1024]
    magnitude = torch.randn(sum(sizes)).abs()
    index = MagnitudeIndex(high_half(magnitude), sizes)
    assert index.nbytes < 0.01 * magnitude.numel() * magnitude.element_size()
