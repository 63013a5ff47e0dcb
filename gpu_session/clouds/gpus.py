"""What a GPU the clouds sell really gives: the memory nvidia-smi reports (less than the GB on the
price list: Lambda sells the A10 as 24 GB, and nvidia-smi says 23,028 MiB) and the CPU architecture
of the machines it comes in. Sizing plans with these figures and the model_server role checks with
nvidia-smi's own, by one rule (gpu_session.fit), so a plan is not refused on the host.

Figures: memory.total of `nvidia-smi --query-gpu=memory.total` as published for each card (NVIDIA's
data sheets list the sold size; the reported size is less by what the driver and ECC keep).
"""

from __future__ import annotations

import re

# (family, GB sold) → MiB nvidia-smi reports. Families are matched in this order (GH200 before H200
# before H100, A10G before A10, L40S before L40 before L4).
REPORTED_MIB = {
    ("GH200", 96): 97871,
    ("H200", 141): 143771,
    ("B200", 180): 183359,
    ("H100", 80): 81559,
    ("H100", 94): 95830,  # H100 NVL
    ("A100", 40): 40960,
    ("A100", 80): 81920,
    ("A6000", 48): 49140,
    ("A5000", 24): 24564,
    ("A40", 48): 46068,
    ("A10G", 24): 23028,
    ("A10", 24): 23028,
    ("L40S", 48): 46068,
    ("L40", 48): 46068,
    ("L4", 24): 23034,
    ("4090", 24): 24564,
    ("3090", 24): 24576,
    ("V100", 16): 16160,
    ("V100", 32): 32510,
}
FAMILIES = list(dict.fromkeys(family for family, _ in REPORTED_MIB))
# Where a card is not in the table: the share of the sold size the least generous card above reports (A10's).
UNKNOWN_SHARE = 0.93
# GPUs sold only in Arm machines (NVIDIA Grace): the engines' locks are x86_64 wheels.
ARM_FAMILIES = ("GH200", "GB200")


def family(gpu_name: str) -> str | None:
    """The card's family in a cloud's name for it ("NVIDIA GeForce RTX 4090" → 4090), or None."""
    upper = gpu_name.upper()
    return next((f for f in (*ARM_FAMILIES, *FAMILIES) if re.search(rf"(?<![A-Z0-9]){f}(?![A-Z0-9])", upper)), None)


def reported_mib(gpu_name: str, vram_gb: int) -> int:
    """MiB nvidia-smi reports for one such GPU sold as `vram_gb` GB."""
    known = REPORTED_MIB.get((family(gpu_name), vram_gb))
    return known if known else int(vram_gb * 1024 * UNKNOWN_SHARE)


def arch(gpu_name: str) -> str:
    """aarch64 for the Grace machines, x86_64 for the rest."""
    return "aarch64" if family(gpu_name) in ARM_FAMILIES else "x86_64"
