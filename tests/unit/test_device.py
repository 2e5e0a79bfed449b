"""Device selection (--device, CUDA_VISIBLE_DEVICES, NVML present or not), the heartbeat's device fields and
labels, GPU budgets, and memory measurement, on a CPU host with a stand-in NVML where a GPU is needed."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from broker.settings import Settings
from workers.device import CPU_DEVICE, Device, DeviceError, gpu_budget_mb, parse_device, resolve_device
from workers.footprint import MemoryMeter, Sample, rss_bytes
from workers.nvml import open_nvml
from workers.worker import Worker

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    name: str
    uuid: str
    total: int
    free: int
    processes: dict[int, int]


class FakeNvml:
    """Just enough of pynvml: devices by index and UUID, memory, compute processes."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[FakeGpu], fail_init: str | None = None) -> None:
        self.gpus, self.fail_init = gpus, fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError(self.fail_init)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        if i >= len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        return h.name.encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(total=h.total, free=h.free, used=h.total - h.free)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.processes.items()]


def two_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu("NVIDIA A10G", "GPU-aaaa-1111", 24_000 * MIB, 23_000 * MIB, {}),
                     FakeGpu("NVIDIA H100 80GB HBM3", "GPU-bbbb-2222", 81_000 * MIB, 80_000 * MIB, {})])  # fmt: skip


def always(value: bool) -> Any:
    return lambda: value


# --device ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [("cpu", "cpu"), ("auto", "auto"), ("cuda", "cuda:0"),
                                              ("CUDA:3", "cuda:3"), (" cuda:12 ", "cuda:12")])  # fmt: skip
def test_device_names_are_normalised(text: str, parsed: str) -> None:
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "tpu:0", ""])
def test_other_device_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected auto, cpu or cuda:N"):
        parse_device(text)


def test_cpu_is_the_cpu_whatever_the_host_has() -> None:
    assert resolve_device("cpu", None, two_gpus()) is CPU_DEVICE


def test_auto_is_the_cpu_without_nvml_or_without_a_gpu() -> None:
    assert resolve_device("auto", None, FakeNvml([], fail_init="Driver Not Loaded")) == CPU_DEVICE
    assert resolve_device("auto", None, FakeNvml([])) == CPU_DEVICE
    assert resolve_device("auto", "", two_gpus(), always(True)) == CPU_DEVICE  # CUDA_VISIBLE_DEVICES hides all


def test_auto_takes_the_first_visible_gpu_only_where_onnxruntime_can_use_it() -> None:
    assert resolve_device("auto", None, two_gpus(), always(False)) == CPU_DEVICE
    device = resolve_device("auto", None, two_gpus(), always(True))
    assert (device.kind, device.id, device.name) == ("cuda", "cuda:0", "NVIDIA A10G")


def test_a_cuda_device_on_a_host_without_one_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match=r"--device cuda:0: no CUDA device can be seen: NVML cannot start"):
        resolve_device("cuda:0", None, FakeNvml([], fail_init="Driver Not Loaded"))
    with pytest.raises(DeviceError, match=r"--device cuda:2: no CUDA device 2: 2 visible"):
        resolve_device("cuda:2", None, two_gpus())


def test_without_nvidia_ml_py_a_cuda_device_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    with pytest.raises(DeviceError, match=r"nvidia-ml-py is not installed \(pip install 'servemesh\[gpu\]'\)"):
        resolve_device("cuda:0", None)
    assert resolve_device("auto", None) == CPU_DEVICE


def test_cuda_visible_devices_renumbers_the_devices_as_cuda_does() -> None:
    assert resolve_device("cuda:0", "1", two_gpus()).name == "NVIDIA H100 80GB HBM3"
    assert resolve_device("cuda:1", "1,0", two_gpus()).name == "NVIDIA A10G"
    assert resolve_device("cuda:0", "GPU-bbbb", two_gpus()).uuid == "GPU-bbbb-2222"  # a UUID prefix
    with pytest.raises(DeviceError, match=r"no CUDA device 1: 1 visible \(CUDA_VISIBLE_DEVICES='1,7,0'\)"):
        resolve_device("cuda:1", "1,7,0", two_gpus())  # CUDA stops at the first entry naming no device


# The heartbeat's device and labels ------------------------------------------------------------------------------


def test_a_cpu_devices_heartbeat_has_kind_cpu_and_null_gpu_memory() -> None:
    status = CPU_DEVICE.status()
    assert (status["kind"], status["id"], status["memory_total_mb"], status["memory_free_mb"]) == ("cpu", "cpu",
                                                                                                    None, None)
    assert CPU_DEVICE.labels == {}


def test_a_gpus_heartbeat_has_its_name_memory_and_labels() -> None:
    device = resolve_device("cuda:1", None, two_gpus())
    assert device.status() == {"kind": "cuda", "id": "cuda:1", "name": "NVIDIA H100 80GB HBM3",
                               "memory_total_mb": 81_000, "memory_free_mb": 80_000}  # fmt: skip
    assert device.labels == {"gpu": "true", "gpu.model": "NVIDIA-H100-80GB-HBM3"}


def test_the_gpu_budget_is_what_was_asked_else_most_of_what_is_free() -> None:
    device = resolve_device("cuda:1", None, two_gpus())
    assert gpu_budget_mb(device, None) == 72_000
    assert gpu_budget_mb(device, 30_000) == 30_000
    assert gpu_budget_mb(CPU_DEVICE, 30_000) == 0


class _Conn:
    settings = Settings()


def test_a_cpu_workers_heartbeat_says_cpu_and_budgets_no_gpu() -> None:
    beat = Worker(_Conn(), "w1", memory_mb=2048, labels={"tier": "fast"}).status()  # type: ignore[arg-type]
    assert beat["device"]["kind"] == "cpu" and beat["device"]["memory_total_mb"] is None
    assert (beat["memory_mb"], beat["gpu_memory_mb"], beat["gpu_memory_used_mb"]) == (2048, 0, 0)
    assert beat["labels"] == {"tier": "fast"} and beat["measured"] == {}
    assert beat["rss_mb"] > 0


def test_a_gpu_workers_heartbeat_carries_its_device_budget_and_gpu_labels() -> None:
    device = resolve_device("cuda:0", "1", two_gpus())
    worker = Worker(_Conn(), "g1", labels={"zone": "a", "gpu.model": "h100"}, device=device,  # type: ignore[arg-type]
                    gpu_memory_mb=gpu_budget_mb(device, None))  # fmt: skip
    beat = worker.status()
    assert beat["device"]["name"] == "NVIDIA H100 80GB HBM3" and beat["device"]["memory_free_mb"] == 80_000
    assert beat["gpu_memory_mb"] == 72_000
    assert beat["labels"] == {"gpu": "true", "gpu.model": "h100", "zone": "a"}  # its own labels win


# Measured memory -------------------------------------------------------------------------------------------------


def test_host_memory_is_measured_as_the_change_in_resident_set() -> None:
    meter = MemoryMeter(CPU_DEVICE)
    before = meter.sample()
    weights = np.ones(64 * MIB // 8)  # 64 MiB, touched
    after = meter.sample()
    measured = meter.measure(before, after)
    assert 48 <= measured.host_mb <= 96 and measured.gpu_mb == 0
    del weights
    assert meter.measure(after, Sample(after.host - 10 * MIB)).host_mb == 0  # memory given back counts as none
    assert rss_bytes() > 0


def test_gpu_memory_is_what_this_process_holds_where_nvml_lists_it() -> None:
    nvml = two_gpus()
    device = resolve_device("cuda:0", None, nvml)
    meter = MemoryMeter(device, pid=4242)
    before = meter.sample()  # no context yet: NVML does not list the process
    nvml.gpus[0].processes[4242] = 900 * MIB
    nvml.gpus[0].processes[999] = 5000 * MIB  # another process on the same GPU does not count
    nvml.gpus[0].free -= 5900 * MIB
    assert meter.measure(before, meter.sample()).gpu_mb == 900


def test_gpu_memory_falls_back_to_the_devices_use_where_nvml_lists_no_process() -> None:
    nvml = two_gpus()
    meter = MemoryMeter(resolve_device("cuda:0", None, nvml), pid=4242)  # as in a container: pids not seen
    before = meter.sample()
    nvml.gpus[0].free -= 700 * MIB
    assert meter.measure(before, meter.sample()).gpu_mb == 700


def test_open_nvml_wraps_a_module_that_starts() -> None:
    nvml = open_nvml(two_gpus())
    assert nvml.count() == 2 and nvml.name(nvml.handle("0")) == "NVIDIA A10G"
    assert isinstance(resolve_device("cuda:0", None, two_gpus()), Device)
