"""Which GPU the job's mapping names: torch's device index resolved through CUDA_VISIBLE_DEVICES and, in a
container, NVIDIA_VISIBLE_DEVICES, to what the host's NVML knows (a host index, else a UUID as given).
No GPU needed: host_gpu is a pure function of the index and the two variables."""

import pytest
import torch

from trainmetrics.jobmap import host_gpu
from trainmetrics.trainer.runner import physical_gpus

GPU_A = "GPU-8a4c1f3e-1111-2222-3333-444455556666"
GPU_B = "GPU-0f9e8d7c-aaaa-bbbb-cccc-ddddeeeeffff"
MIG = "MIG-1b2c3d4e-0000-1111-2222-333344445555"


@pytest.mark.parametrize("cuda_index, cuda_visible, nvidia_visible, expected", [
    (1, None, None, 1),                             # nothing remaps: torch's index is the host's
    (1, "3,5", None, 5),
    (0, " 3", None, 3),
    (0, GPU_A, None, GPU_A),                        # was 0, whatever GPU the job was on
    (0, f"{GPU_B},{GPU_A}", None, GPU_B),
    (1, f"0,{MIG}", None, MIG),                     # kept as given, even where the exporter cannot match it
    (1, None, f"{GPU_A},{GPU_B}", GPU_B),           # Kubernetes' device plugin: UUIDs, CUDA numbers from 0
    (0, None, "3", 3),                              # docker --gpus device=3
    (0, "1", "2,5", 5),                             # each inner entry indexes the outer list
    (0, "1", f"{GPU_A},{GPU_B}", GPU_B),
    (0, GPU_A, "2,5", GPU_A),                       # a UUID names its GPU on any host
    (2, "all", "all", 2),                           # all, none, void and empty pick no devices: no remapping
    (2, "", "none", 2),
    (2, "none", " void ", 2),
    (3, "0,1", None, 3),                            # past a list: kept as it stands, not guessed as 0
    (0, "2", "5", 2),
    (0, "gpu0", None, None),                        # neither an index nor a UUID: no GPU named
    (0, "GPU-12", None, None),                      # too short for a UUID
    (0, "\u00b2", None, None),                      # '²'.isdigit() is true, int('²') fails
    (0, None, "0:1", None),                         # a MIG device by index: NVML knows no such index
])
def test_the_host_gpu_is_resolved_through_both_visible_device_lists(cuda_index, cuda_visible, nvidia_visible,
                                                                      expected):
    assert host_gpu(cuda_index, cuda_visible, nvidia_visible) == expected


@pytest.mark.parametrize("cuda_index, cuda_visible, nvidia_visible, expected", [
    (0, GPU_A, None, [GPU_A]),
    (0, MIG, None, [MIG]),
    (1, None, f"{GPU_A},{GPU_B}", [GPU_B]),
    (1, None, "4,7", [7]),
    (1, "0,3", None, [3]),
    (0, "gpu0", None, []),
])
def test_the_job_mapping_names_the_gpu_the_environment_gave_the_job(monkeypatch, cuda_index, cuda_visible,
                                                                    nvidia_visible, expected):
    for name, value in (("CUDA_VISIBLE_DEVICES", cuda_visible), ("NVIDIA_VISIBLE_DEVICES", nvidia_visible)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert physical_gpus(torch.device("cuda", cuda_index)) == expected
    assert physical_gpus(torch.device("cpu")) == []
