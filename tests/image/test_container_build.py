"""The image we ship, built as CI builds it: container/build.sh (buildah with chroot isolation
and vfs storage, a debootstrap root cached in ~/.cache/spotstart/) into an OCI layout, pushed
to the run's registry, audited under a waste budget, profiled in the sandbox against the
prefetch lists committed in container/prefetch/, and run as its own user.

Needs root, buildah, debootstrap (tests/setup.sh installs them) and the Debian mirror: without
them the tests skip on a developer's machine and FAIL in CI ($CI set). On the 2-core CI
machine the module took 2.5-3 min cold (the debootstrap root made) and 1.5 min with the root
cached; container/build.sh alone 1m51s-3m32s cold, 1m02s-1m10s cached.
SPOTSTART_UPDATE_PREFETCH=1 rewrites container/prefetch/ from this run's profile (after a
change to what serve-peers imports, or to container/requirements.lock)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from spotstart import __version__
from spotstart.emulate.registry import DockerRegistry
from tests.conftest import run_cli
from tests.image import builder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
PREFETCH = REPO / "container" / "prefetch" / "serve-peers"
TOOLS = ("buildah", "debootstrap", "skopeo", "umoci", "bwrap", "strace", "chroot")
LISTS = ("nydus-prefetch.txt", "soci-prefetch.json", "estargz-record.jsonl")
PEER_PORT = 8471  # inside the sandbox's own network namespace: never taken


def _unavailable() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} missing (tests/setup.sh installs them)"
    if os.geteuid() != 0:
        return "container/build.sh needs root (debootstrap, buildah's chroot isolation)"
    return None


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image, built once for the module: an OCI layout tagged with the package version."""
    why = _unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI builds the image: {why}")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("container")
    log = d / "build.log"
    with open(log, "wb") as f:
        proc = subprocess.run(
            [str(REPO / "container" / "build.sh"), str(d / "oci"), __version__],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=1100,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"container/build.sh exited {proc.returncode}:\n{tail}")
    return d / "oci"


@pytest.fixture(scope="module")
def pushed(layout: Path, registry: DockerRegistry) -> str:
    ref = f"{registry.address}/spotstart/spotstart:{__version__}"
    builder.skopeo(f"oci:{layout}:{__version__}", f"docker://{ref}", "--dest-tls-verify=false")
    return ref


def _blob(layout: Path, digest: str) -> dict:
    algo, _, hexa = digest.partition(":")
    return json.loads((layout / "blobs" / algo / hexa).read_text())


def test_image_config_runs_spotstart_as_uid_65532_with_oci_labels(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    [desc] = index["manifests"]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == __version__
    manifest = _blob(layout, desc["digest"])
    config = _blob(layout, manifest["config"]["digest"])
    assert len(manifest["layers"]) == 3  # base root, locked dependencies, spotstart
    c = config["config"]
    assert c["User"] == "65532:65532"
    assert c["Entrypoint"] == ["/opt/spotstart/bin/spotstart"]
    assert c["Env"][0].startswith("PATH=/opt/spotstart/bin:")  # `command: [spotstart, ...]`
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "spotstart"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(labels["org.opencontainers.image.revision"]) == 40
    history = [h.get("created_by", "") for h in config["history"]]
    assert history[0].startswith("container/base.sh: debootstrap")
    # nothing of the build host in the config: no proxy or pip settings, no build paths
    text = json.dumps(config)
    for leak in ("proxy", "PIP_", "spotstart-build.", "spotstart-base.", "/root/", "TMPDIR"):
        assert leak.lower() not in text.lower(), leak
    assert {e.split("=", 1)[0] for e in c["Env"]} == {
        "PATH",
        "HOME",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    }


def test_the_built_image_runs_spotstart_version_as_its_user(layout: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    builder.run("umoci", "unpack", "--image", f"{layout}:{__version__}", bundle)
    root = bundle / "rootfs"
    out = subprocess.run(
        [
            shutil.which("chroot") or "chroot",
            "--userspec=65532:65532",
            str(root),
            "/opt/spotstart/bin/spotstart",
            "--version",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/home/spotstart", "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"spotstart {__version__}"
    # what base.sh strips stays stripped: no setuid programs, no apt lists, no pip in the venv
    setuid = [
        os.path.join(d, n)
        for d, _, names in os.walk(root)
        for n in names
        if os.lstat(os.path.join(d, n)).st_mode & 0o6000
    ]
    assert setuid == []
    # nothing the image's user (or code a dependency runs) may change for the next reader:
    # no world-writable file, no world-writable directory without the sticky bit (/tmp's)
    writable = [
        p
        for d, dirs, names in os.walk(root)
        for p in (os.path.join(d, n) for n in dirs + names)
        if not os.path.islink(p)
        and os.lstat(p).st_mode & 0o002
        and not (os.path.isdir(p) and os.lstat(p).st_mode & 0o1000)
    ]
    assert writable == []
    assert root.stat().st_mode & 0o755 == 0o755  # `/` itself, not mktemp's 0700
    # no secret or setting of the build host: pip's, netrc, root's caches
    for leak in ("root/.netrc", "root/.cache", "root/.config", "etc/pip.conf", "etc/xdg/pip"):
        assert not (root / leak).exists(), leak
    assert (root / "etc/resolv.conf").read_bytes() == b""  # not the build host's nameservers
    assert (root / "etc/apt/sources.list").read_text().split() == [
        "deb",
        "http://deb.debian.org/debian",
        "bookworm",
        "main",
    ]
    assert not list((root / "var/lib/apt/lists").iterdir())
    assert not (root / "opt/spotstart/bin/pip").exists()
    assert (root / "home/spotstart").stat().st_uid == 65532


def test_image_from_the_registry_passes_its_waste_budget(pushed: str) -> None:
    result = run_cli(
        [
            "image",
            "audit",
            f"docker://{pushed}",
            "--target",
            "cpu",
            "--max-waste-ratio",
            "0.01",
            "--json",
        ],
        timeout_s=300,
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "registry"
    assert len(report["layers"]) == 3
    assert report["waste_ratio"] <= 0.01
    assert report["bytes_hidden"] == 0  # no layer overwrites or deletes another's files
    rules = {f["rule"] for f in report["findings"] if f["counted"]}
    assert not rules & {"package-caches", "apt-lists-caches", "tests-docs-in-site-packages"}


def test_profile_of_serve_peers_matches_the_committed_prefetch_lists(
    pushed: str, tmp_path: Path
) -> None:
    out = tmp_path / "profile"
    result = run_cli(
        [
            "image",
            "profile",
            "--image",
            f"docker://{pushed}",
            "--ready-url",
            f"http://127.0.0.1:{PEER_PORT}/v1/inventory",
            "-o",
            str(out),
            "--json",
            "--",
            "/opt/spotstart/bin/spotstart",
            "serve-peers",
            "/tmp",
            "--listen",
            f"127.0.0.1:{PEER_PORT}",
            "--no-token",
        ],
        timeout_s=300,
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tracer"] == "strace"
    assert summary["weight_files"] == 0
    assert not any("not files of the image" in w for w in summary["warnings"])
    if os.environ.get("SPOTSTART_UPDATE_PREFETCH"):
        PREFETCH.mkdir(parents=True, exist_ok=True)
        for name in LISTS:
            shutil.copyfile(out / name, PREFETCH / name)
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert "/opt/spotstart/bin/spotstart" in nydus
    # the bytecode build.sh compiled (unchecked hashes: the sources are not even opened)
    assert any("/spotstart/cli/__pycache__/peers_cmd." in p for p in nydus)
    for name in LISTS:
        committed = (PREFETCH / name).read_text()
        assert (out / name).read_text() == committed, (
            f"container/prefetch/serve-peers/{name} is not what the image's start reads now: "
            "rerun this test with SPOTSTART_UPDATE_PREFETCH=1 and commit the lists"
        )
