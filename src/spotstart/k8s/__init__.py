"""Kubernetes: manifests for GKE, EKS and AKS rendered from one small config (pure), for the
served model behind `spotstart guard`; the in-cluster controller (`controller.py`) keeping its
replicas ready with the fleet policies of `spotstart plan` (`driver.py`)."""

from __future__ import annotations

from spotstart.k8s.config import CLOUDS, DeployConfig, DeployConfigError, load_config, parse_config
from spotstart.k8s.render import Manifest, render, to_yaml, write_manifests

__all__ = [
    "CLOUDS",
    "DeployConfig",
    "DeployConfigError",
    "Manifest",
    "load_config",
    "parse_config",
    "render",
    "to_yaml",
    "write_manifests",
]
