"""`spotstart image audit` on images built in the test run with umoci and skopeo: every rule
finds the exact bytes put there, the whiteout/opaque/hardlink accounting matches the hand
count, on each way an image is stored (OCI dir, oci-archive, docker-archive, zstd, registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotstart.emulate.crosscheck import Nginx
from spotstart.emulate.registry import DockerRegistry
from spotstart.image import AuditOptions, RuleOptions, audit
from spotstart.image.oci import REF_NAME
from tests.conftest import error_line, run_cli
from tests.image import builder
from tests.image.conftest import EXPECTED, HIDDEN_BY_LAYER, NOT_COUNTED

pytestmark = pytest.mark.timeout(300)


def _static_registry(layout: Path, nginx: Nginx, repo: str, tag: str) -> str:
    """The distribution API's read side as static files behind nginx (a second server: its
    own ranges, no Docker-Content-Digest, octet-stream content types): a manifest by tag and
    by digest, every blob by digest."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"][REF_NAME] == tag)
    blobs = layout / "blobs" / "sha256"
    files = {f"v2/{repo}/blobs/sha256:{p.name}": p.read_bytes() for p in blobs.iterdir()}
    manifest = (blobs / desc["digest"].split(":")[1]).read_bytes()
    files[f"v2/{repo}/manifests/{tag}"] = manifest
    files[f"v2/{repo}/manifests/{desc['digest']}"] = manifest
    nginx.seed(files)
    return f"{nginx.host}:{nginx.port}/{repo}:{tag}"


def _ref(kind: str, images: dict[str, Path], registry: DockerRegistry, nginx: Nginx) -> str:
    if kind == "static-registry":
        return _static_registry(images["oci"], nginx, "static/app", "v1")
    if kind == "registry":
        builder.skopeo(
            f"oci:{images['oci']}:v1",
            f"docker://{registry.address}/team/app:v1",
            "--dest-tls-verify=false",
        )
        return f"{registry.address}/team/app:v1"
    return {
        "oci": f"oci:{images['oci']}:v1",
        "docker": str(images["docker"]),
        "oci-archive": str(images["oci-archive"]),
        "zstd": f"{images['zstd']}:v1",
    }[kind]


KINDS = ["oci", "docker", "oci-archive", "zstd", "registry", "static-registry"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_rule_finds_the_exact_bytes_the_image_holds(
    kind: str, images: dict[str, Path], registry: DockerRegistry, nginx: Nginx
) -> None:
    report = audit(_ref(kind, images, registry, nginx))
    found = {f.rule: f.bytes for f in report.findings}
    assert found == EXPECTED
    assert {f.rule for f in report.findings if not f.counted} == NOT_COUNTED
    assert {layer.index: layer.bytes_wasted for layer in report.layers} == HIDDEN_BY_LAYER
    assert report.bytes_hidden == sum(HIDDEN_BY_LAYER.values())
    # each byte once: the counted rules, plus what later layers hid that no rule claims
    # (the pip cache is both, and counts once)
    counted = sum(v for r, v in EXPECTED.items() if r not in NOT_COUNTED)
    assert report.bytes_waste == counted + 500 + 8000 + 2000
    assert [layer.command for layer in report.layers][1] == "RUN pip install -r requirements.txt"
    compression = {layer.compression for layer in report.layers}
    assert compression == (
        {"none"} if kind == "docker" else {"zstd"} if kind == "zstd" else {"gzip"}
    )
    if kind == "docker":
        assert all(layer.bytes_compressed is None for layer in report.layers)
    else:
        assert all(layer.bytes_compressed for layer in report.layers)


def test_a_rule_the_user_answers_counts_and_cpu_targets_flag_cuda_torch(
    images: dict[str, Path],
) -> None:
    options = AuditOptions(rules=RuleOptions(target="cpu", triton_backends=frozenset({"python"})))
    found = {f.rule: f for f in audit(f"oci:{images['oci']}:v1", options).findings}
    assert found["triton-backends-unused"].bytes == 9000 + 12000
    assert found["triton-backends-unused"].counted
    # libtorch_cuda.so and the cudnn wheel (the cublas wheel is already the duplicate rule's)
    assert found["torch-cuda-on-cpu"].bytes == 60000 + 20000


def test_baked_weights_finding_says_how_much_faster_the_fetch_is(images: dict[str, Path]) -> None:
    found = {f.rule: f for f in audit(f"oci:{images['oci']}:v1").findings}
    assert "spotstart fetch" in found["baked-weights"].note
    assert "x faster" in found["baked-weights"].note


def test_against_reports_the_change_per_rule(images: dict[str, Path]) -> None:
    result = run_cli(
        [
            "image",
            "audit",
            f"oci:{images['oci']}:v1",
            "--against",
            f"oci:{images['oci']}:v2",
            "--json",
        ]
    )
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    deltas = {r["rule"]: r["bytes_delta"] for r in doc["rules"]}
    assert deltas["two-torches"] == 1000 + 60000  # the first torch, still pulled under the second
    assert deltas["package-caches"] == 0
    assert doc["layers_shared"] == 4


def test_ci_gate_exits_14_over_budget_and_0_under(images: dict[str, Path]) -> None:
    ref = f"oci:{images['oci']}:v1"
    over = run_cli(["image", "audit", ref, "--max-waste-bytes", "1MB"])
    assert over.code == 14
    assert "waste over budget" in error_line(over.stderr)
    ratio = run_cli(["image", "audit", ref, "--max-waste-ratio", "0.5"])
    assert ratio.code == 14
    fine = run_cli(["image", "audit", ref, "--max-waste-bytes", "1GB", "--max-waste-ratio", "0.99"])
    assert fine.code == 0, fine.stderr
    assert "package-caches" in fine.stdout and "baked-weights" in fine.stdout


def test_json_report_carries_layers_findings_and_pull_estimates(images: dict[str, Path]) -> None:
    result = run_cli(["image", "audit", str(images["oci-archive"]), "--json", "--bandwidth", "500"])
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "oci-archive"
    assert len(doc["layers"]) == 4
    assert doc["pull_seconds"] > doc["pull_seconds_without_waste"] > 0
    assert {f["rule"] for f in doc["findings"]} == set(EXPECTED)
