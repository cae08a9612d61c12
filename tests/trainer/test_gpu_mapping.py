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
    (2, "", "all", 2),
    (2, "none", None, 2),
    (2, "", "none", None),                          # the runtime gave no GPU: the one seen came another way (CDI)
    (2, "none", " void ", None),
    (0, GPU_A, "void", GPU_A),                      # a UUID names its GPU whichever way the container got it
    (3, "0,1", None, None),                         # past a list: the list is not the process's GPUs
    (0, "2", "5", None),
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


@pytest.mark.parametrize("nvidia_visible", ["void", "none", "", " VOID "])
def test_a_gpu_a_container_got_by_cdi_is_no_host_gpu_guessed_from_its_cuda_index(monkeypatch, nvidia_visible):
    """CDI (`podman/docker run --device nvidia.com/gpu=2`, the GPU Operator's CDI mode) injects the container's GPUs
    and sets NVIDIA_VISIBLE_DEVICES=void; CUDA numbers them from 0. void, none and empty were read as "no
    remapping", so a job on host GPU 2 declared host GPU 0: another job's GPU was charged to it."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", nvidia_visible)
    assert physical_gpus(torch.device("cuda", 0)) == []
    assert physical_gpus(torch.device("cuda", 1)) == []


def test_an_index_past_the_containers_list_names_no_host_gpu(monkeypatch):
    """Kubernetes' device plugin with the volume-mounts strategy sets NVIDIA_VISIBLE_DEVICES to a path, one entry
    that is no GPU: cuda:0 declared none, but cuda:1, past that list, was kept as host GPU 1, another pod's."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "/var/run/nvidia-container-devices")
    assert physical_gpus(torch.device("cuda", 0)) == []
    assert physical_gpus(torch.device("cuda", 1)) == []
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "5")     # one GPU in the container, an index past it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert physical_gpus(torch.device("cuda", 0)) == []
