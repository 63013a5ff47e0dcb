"""What the simulated clouds sell: Lambda instance types and regions, RunPod GPU types and data centers.

Prices and shapes follow the public price lists closely enough for sizing and cost tests; they are
not a promise about today's real prices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LambdaType:
    name: str
    gpu: str  # e.g. "H100"
    vram_gb: int
    form: str  # "PCIe", "SXM5", ""
    gpus: int
    price_cents_per_hour: int
    vcpus: int
    memory_gib: int
    storage_gib: int
    # Per GPU, as nvidia-smi's memory.total reports it (public nvidia-smi outputs of each GPU): less
    # than the GB sold × 1024, and what a fit check on the host sees.
    memory_mib: int

    @property
    def gpu_description(self) -> str:
        form = f" {self.form}" if self.form else ""
        return f"{self.gpu} ({self.vram_gb} GB{form})"

    @property
    def description(self) -> str:
        return f"{self.gpus}x {self.gpu_description}"


LAMBDA_TYPES = [
    LambdaType("gpu_1x_a10", "A10", 24, "PCIe", 1, 75, 30, 200, 1400, 23028),
    LambdaType("gpu_1x_a6000", "RTX A6000", 48, "", 1, 80, 14, 100, 512, 49140),
    LambdaType("gpu_1x_a100_sxm4", "A100", 40, "SXM4", 1, 129, 30, 200, 512, 40960),
    LambdaType("gpu_1x_gh200", "GH200", 96, "", 1, 149, 64, 432, 4096, 97871),
    LambdaType("gpu_1x_h100_pcie", "H100", 80, "PCIe", 1, 249, 26, 200, 1024, 81559),
    LambdaType("gpu_2x_h100_sxm5", "H100", 80, "SXM5", 2, 598, 52, 450, 3500, 81559),
    LambdaType("gpu_8x_a100_80gb_sxm4", "A100", 80, "SXM4", 8, 1432, 240, 1800, 20000, 81920),
    LambdaType("gpu_8x_h100_sxm5", "H100", 80, "SXM5", 8, 2392, 208, 1800, 24000, 81559),
]

LAMBDA_REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-south-1": "Texas, USA",
    "europe-central-1": "Germany",
    "asia-northeast-1": "Tokyo, Japan",
}

LAMBDA_IMAGES = [
    {"family": "lambda-stack-22-04", "name": "lambda-stack-22.04", "version": "22.04"},
    {"family": "ubuntu-lts", "name": "ubuntu-24.04.01", "version": "24.04.01"},
]


@dataclass(frozen=True)
class RunpodGpu:
    id: str  # e.g. "NVIDIA GeForce RTX 4090"
    display_name: str
    memory_gb: int
    memory_mib: int  # as nvidia-smi's memory.total reports it
    secure_price: float  # USD per GPU-hour
    community_price: float
    secure_spot_price: float
    community_spot_price: float
    max_gpu_count: int = 8
    cuda_cores: int = 0


RUNPOD_GPUS = [
    RunpodGpu("NVIDIA RTX A5000", "RTX A5000", 24, 24564, 0.27, 0.16, 0.13, 0.11),
    RunpodGpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 24564, 0.69, 0.34, 0.35, 0.20),
    RunpodGpu("NVIDIA RTX A6000", "RTX A6000", 48, 49140, 0.49, 0.33, 0.25, 0.19),
    RunpodGpu("NVIDIA L40S", "L40S", 48, 46068, 0.86, 0.79, 0.43, 0.40),
    RunpodGpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 81920, 1.64, 1.19, 0.82, 0.60),
    RunpodGpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 81559, 2.69, 2.39, 1.35, 1.20),
    RunpodGpu("NVIDIA H200", "H200 SXM", 141, 143771, 3.99, 3.59, 2.00, 1.80),
]


@dataclass(frozen=True)
class Driver:
    """An NVIDIA driver a host runs: nvidia-smi's driver_version, and the newest CUDA it runs (the
    "CUDA Version" nvidia-smi prints; what RunPod's allowedCudaVersions matches). Real driver
    releases and the CUDA version each reports; NVIDIA's CUDA toolkit release notes give the minimum
    driver per version (12.4: 550.54, 12.8: 570.26, 13.0: 580.65)."""

    version: str
    cuda: str


DRIVERS = (Driver("550.127.05", "12.4"), Driver("570.133.20", "12.8"), Driver("580.95.05", "13.0"))
LAMBDA_DRIVER = DRIVERS[-1]  # Lambda's images keep a recent driver


def runpod_host_driver(allowed_cuda: list[str] | None) -> Driver | None:
    """The driver of the host a RunPod pod lands on. Without allowedCudaVersions RunPod may place it
    on any host, old drivers included: here, the oldest. With it, a host whose CUDA version is
    allowed (the newest such), or None: no host fits, which RunPod answers as no capacity."""
    if not allowed_cuda:
        return DRIVERS[0]
    return next((d for d in reversed(DRIVERS) if d.cuda in allowed_cuda), None)


RUNPOD_DATA_CENTERS = ["US-TX-3", "US-GA-1", "EU-RO-1", "EU-SE-1", "CA-MTL-1"]

# Default capacity: instances of a type each region can hold when a test or a person does not say otherwise.
DEFAULT_CAPACITY = 8


def lambda_type(name: str) -> LambdaType | None:
    return next((t for t in LAMBDA_TYPES if t.name == name), None)


def runpod_gpu(gpu_id: str) -> RunpodGpu | None:
    return next((g for g in RUNPOD_GPUS if g.id == gpu_id), None)
