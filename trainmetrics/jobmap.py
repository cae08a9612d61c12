"""The job-mapping directory: how the exporter learns which processes and GPUs belong to which job.

Each running job process writes one JSON file, ``<job_id>.rank<N>.json`` (rank 0 too), into the directory at
start and removes it at exit (the idea of dcgm-exporter's job mapping, without a scheduler)::

    {"job_id": "mnist-1", "pid": 4242, "gpus": [0], "rank": 0, "started": 1763779200.5, "start_ticks": 8630412}

`start_ticks` is when the process started, in clock ticks since boot (/proc/PID/stat field 22): with the
file's owner it proves which process the file means. Readers treat the directory as untrusted: they ignore
files that do not parse, files whose pid is dead or now another process (a job killed with -9 cannot clean
up), and files whose owner is neither root nor the process's user.

`gpus` names the process's GPUs as the host's NVML knows them: a host index, or a UUID (`GPU-…`, a MIG
instance's `MIG-…`) where no index can be told. host_gpu() works that out from the process's environment.
"""

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainmetrics.contract import validate_job_id
from trainmetrics.jobfiles import replace_atomically


# A GPU's UUID as NVML and CUDA write it (CUDA also takes a unique prefix of one, hence the range of lengths).
GPU_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F-]{8,80}")
HOST_INDEX = re.compile(r"[0-9]+")    # ASCII only: str.isdigit() is true for '²' too
# *_VISIBLE_DEVICES values that pick no devices in particular: no remapping at that level.
NO_REMAPPING = {"", "all", "none", "void"}
# NVIDIA_VISIBLE_DEVICES values under which the container runtime gave the container no GPU: one the process sees
# came another way, as CDI injects them (`--device nvidia.com/gpu=2`, the GPU Operator's CDI mode: its spec sets
# void), numbered from 0 whatever host GPU it is.
NO_GPU_BY_RUNTIME = {"", "none", "void"}


def is_gpu_id(value: object) -> bool:
    """True for what a mapping's `gpus` may hold: an NVML index or a GPU/MIG UUID."""
    if isinstance(value, str):
        return GPU_UUID.fullmatch(value) is not None
    return type(value) is int    # type(), not isinstance(): True is not a GPU


def gpu_spelling(entry: str) -> str | None:
    """A CUDA_VISIBLE_DEVICES entry as the one spelling the job server gives and compares GPUs by: a host index
    without leading zeros (CUDA reads '01' as GPU 1), a GPU/MIG UUID with its hex digits in lower case as NVML
    writes them (CUDA takes either case); None for an entry that is neither (where CUDA stops reading)."""
    if HOST_INDEX.fullmatch(entry):
        return entry.lstrip("0") or "0"      # (not int(): past 4300 digits it raises)
    return entry[:4] + entry[4:].lower() if GPU_UUID.fullmatch(entry) else None


def same_gpu(one: str, other: str) -> bool:
    """True when two spellings (gpu_spelling's) may name one GPU: equal, or one UUID a prefix of the other (CUDA
    takes a unique prefix of a UUID)."""
    return one == other or (not HOST_INDEX.fullmatch(one) and not HOST_INDEX.fullmatch(other)
                            and (one.startswith(other) or other.startswith(one)))


def host_gpu(cuda_index: int, cuda_visible: str | None, nvidia_visible: str | None) -> int | str | None:
    """The GPU that this process's CUDA device cuda_index is, as the host's NVML knows it.

    CUDA numbers the devices CUDA_VISIBLE_DEVICES lists; in a container, the runtime (NVIDIA's device plugin,
    `docker --gpus`) gives the container the host GPUs NVIDIA_VISIBLE_DEVICES lists, numbered from 0. So the
    CUDA index picks an entry of CUDA_VISIBLE_DEVICES, and an index found there picks one of
    NVIDIA_VISIBLE_DEVICES. A UUID names its GPU on any host: it is kept as given, even where the exporter
    may not know it (a MIG instance), rather than guessed as an index. None where no GPU can be named: an
    entry that is neither an index nor a UUID, an index past a list, or an index into a container whose GPUs
    NVIDIA_VISIBLE_DEVICES does not list (void, none, empty).
    """
    gpu = _listed_gpu(cuda_index, cuda_visible)
    if isinstance(gpu, int):    # an index into the container's GPUs (a UUID names its GPU anywhere)
        if nvidia_visible is not None and nvidia_visible.strip().lower() in NO_GPU_BY_RUNTIME:
            return None         # host GPU 0 was another job's, not the GPU CDI gave this container
        gpu = _listed_gpu(gpu, nvidia_visible)
    return gpu


def _listed_gpu(index: int, visible: str | None) -> int | str | None:
    """Entry index of a *_VISIBLE_DEVICES list (an int for a host index); index itself when the list picks
    no devices; None when the entry is neither an index nor a UUID, or the list is shorter."""
    if visible is None or visible.strip().lower() in NO_REMAPPING:
        return index
    entries = [entry.strip() for entry in visible.split(",")]
    if index >= len(entries):
        # CUDA numbers only the devices a list names: a list this short is not the process's GPUs (the device
        # plugin's volume-mounts strategy gives a path), and the index kept named another job's GPU.
        return None
    entry = entries[index]
    if HOST_INDEX.fullmatch(entry):
        return int(entry)
    return entry if GPU_UUID.fullmatch(entry) else None


def check_gpus(gpus: object) -> list[int | str]:
    """gpus when it is a list of NVML indices and GPU/MIG UUIDs, each UUID's hex digits in lower case as NVML
    writes them (CUDA_VISIBLE_DEVICES may have them in upper case: its GPU was then held by no job); ValueError
    otherwise."""
    if not isinstance(gpus, list) or not all(is_gpu_id(gpu) for gpu in gpus):
        raise ValueError("gpus must be a list of GPU indices and GPU-/MIG- UUIDs")
    return [gpu[:4] + gpu[4:].lower() if isinstance(gpu, str) else gpu for gpu in gpus]


@dataclass(frozen=True)
class JobMapping:
    """One job process: its id, pid, its GPUs (host indices or UUIDs), its rank, and when it started."""

    job_id: str
    pid: int
    gpus: list[int | str] = field(default_factory=list)
    rank: int = 0
    started: float = 0.0
    start_ticks: int = 0    # 0: write_job_mapping reads it from /proc/PID/stat

    def file_name(self) -> str:
        """The mapping's file name: one file per job process."""
        return f"{self.job_id}.rank{self.rank}.json"


def process_start_ticks(pid: int | str = "self") -> int:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def write_job_mapping(directory: Path, mapping: JobMapping) -> Path:
    """Write the mapping, with its process's start ticks, atomically (jobfiles.replace_atomically: the
    directory is shared); return its path."""
    validate_job_id(mapping.job_id)
    check_gpus(mapping.gpus)    # the exporter refuses a mapping with anything else in it
    if not mapping.start_ticks:
        mapping = replace(mapping, start_ticks=process_start_ticks(mapping.pid))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / mapping.file_name()
    # Readable by all: the node exporter reading the directory may run as another user.
    replace_atomically(path, json.dumps(asdict(mapping)), mode=0o644)
    return path
