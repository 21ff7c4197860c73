"""`spotstart k8s render --config deploy.yaml --cloud gke|eks|aks [-o DIR]`: the manifests of a
served model, one file per object (or all of them on stdout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from spotstart.errors import UsageError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "k8s",
        help="Kubernetes manifests for GKE, EKS, AKS",
        description="Render the manifests of a served model: spot and on-demand Deployments "
        "behind one Service, zone spread, weights on local SSD, spotstart guard as the "
        "entrypoint with its probes, the grace period inside the cloud's notice, and the "
        "cloud's node classes (GKE ComputeClass, Karpenter NodePool/EC2NodeClass).",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("render", help="write the manifests")
    r.add_argument("--config", required=True, type=Path, metavar="FILE", help="deploy.yaml")
    r.add_argument("--cloud", required=True, choices=("gke", "eks", "aks"))
    r.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="DIR",
        help="write one file per object (and a Kustomization) here; default: stdout",
    )
    r.set_defaults(run=run_render)


def run_render(args: argparse.Namespace) -> int:
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise UsageError("spotstart k8s needs PyYAML: pip install 'spotstart[k8s]'") from exc
    from spotstart.k8s import load_config, render, to_yaml, write_manifests
    from spotstart.k8s.config import Cloud

    cloud = cast(Cloud, args.cloud)
    manifests = render(load_config(args.config, cloud), cloud)
    if args.out is None:
        sys.stdout.write("---\n".join(to_yaml(m) for m in manifests))
        return 0
    for path in write_manifests(manifests, args.out):
        print(path)
    return 0
