"""The GPUs `spotstart k8s render` knows, and how each cloud names them: GKE's
``cloud.google.com/gke-accelerator`` value, EKS instance types (Karpenter picks among them), AKS
VM sizes. Pure data; a GPU a cloud does not offer has no entry for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuType:
    name: str
    gke_accelerator: str | None
    eks_instance_types: tuple[str, ...]
    aks_vm_sizes: tuple[str, ...]

    def on(self, cloud: str) -> bool:
        return bool(
            {
                "gke": self.gke_accelerator,
                "eks": self.eks_instance_types,
                "aks": self.aks_vm_sizes,
            }[cloud]
        )


# the sizes of AWS's single-GPU-type families g5, g6 and g6e (1, 4 or 8 GPUs each)
_G_SIZES = (
    "xlarge",
    "2xlarge",
    "4xlarge",
    "8xlarge",
    "12xlarge",
    "16xlarge",
    "24xlarge",
    "48xlarge",
)


def _sizes(family: str, *sizes: str) -> tuple[str, ...]:
    return tuple(f"{family}.{s}" for s in sizes)


GPUS: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType(
            "nvidia-l4",
            "nvidia-l4",
            _sizes("g6", *_G_SIZES),
            (),
        ),
        GpuType(
            "nvidia-a10g",
            None,
            _sizes("g5", *_G_SIZES),
            (),
        ),
        GpuType(
            "nvidia-l40s",
            None,
            _sizes("g6e", *_G_SIZES),
            (),
        ),
        GpuType(
            "nvidia-t4",
            "nvidia-tesla-t4",
            _sizes("g4dn", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"),
            (
                "Standard_NC4as_T4_v3",
                "Standard_NC8as_T4_v3",
                "Standard_NC16as_T4_v3",
                "Standard_NC64as_T4_v3",
            ),
        ),
        GpuType(
            "nvidia-a100-80gb",
            "nvidia-a100-80gb",
            ("p4de.24xlarge",),
            ("Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_NC96ads_A100_v4"),
        ),
        GpuType(
            "nvidia-h100-80gb",
            "nvidia-h100-80gb",
            ("p5.4xlarge", "p5.48xlarge"),
            ("Standard_NC40ads_H100_v5", "Standard_NC80adis_H100_v5"),
        ),
    )
}
