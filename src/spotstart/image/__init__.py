"""Container images for serving: audit what slows a pull (``audit``), profile what a start
reads (``profile``). Reads docker save archives, OCI layouts and registries; never writes an
image and never deletes a file from one."""

from spotstart.image.audit import (
    AuditOptions,
    AuditReport,
    Comparison,
    LayerReport,
    audit,
    compare,
    open_image,
    read_profile_paths,
)
from spotstart.image.oci import Platform
from spotstart.image.pull import PullModel
from spotstart.image.rules import Finding, RuleOptions

__all__ = [
    "AuditOptions",
    "AuditReport",
    "Comparison",
    "Finding",
    "LayerReport",
    "Platform",
    "PullModel",
    "RuleOptions",
    "audit",
    "compare",
    "open_image",
    "read_profile_paths",
]
