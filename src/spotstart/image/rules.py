"""What makes a serving image slow to pull: rules over the bytes each layer pulls (pure).

Each rule names the bytes and files it found and a concrete fix. A file is counted by the
first rule that matches it (the order below), so the rules' totals add up without double
counting. Bytes hidden by a later layer (overwritten or deleted) are still pulled: a rule
counts them too, and says that deleting in a later layer does not shrink the pull.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from spotstart.image.tree import Inode, MergedTree

WEIGHT_MIN_BYTES = 1 << 20  # smaller ".pt"/".bin" files are fixtures and vocabularies
_SITE = re.compile(r"/(?:site|dist)-packages/")
_STDLIB = re.compile(r"/lib/python3(?:\.\d+)?/(?!site-packages/|dist-packages/)")
_CUDA_ROOT = re.compile(r"^/usr/local/cuda[^/]*/")


@dataclass(frozen=True)
class Finding:
    rule: str
    title: str
    bytes: int
    files: int
    fix: str
    examples: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    counted: bool = True  # False: needs the user's word before it counts as waste
    note: str = ""


@dataclass(frozen=True)
class RuleOptions:
    """``target``: what the image serves on ("gpu" or "cpu": a CUDA torch on a CPU image is
    waste). ``triton_backends``: the Triton backends the models use (None: not known)."""

    target: str = "gpu"
    triton_backends: frozenset[str] | None = None


@dataclass(frozen=True)
class PathRule:
    rule: str
    title: str
    fix: str
    match: Callable[[str], bool]


def _regex(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern)
    return lambda p: compiled.search(p) is not None


def _pyc_outside_site(path: str) -> bool:
    if not (path.endswith((".pyc", ".pyo")) or "/__pycache__/" in path):
        return False
    return _SITE.search(path) is None and _STDLIB.search(path) is None


_WEIGHT_EXT = (
    ".safetensors",
    ".gguf",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".h5",
    ".msgpack",
    ".tflite",
)
_HF_HUB = "/huggingface/hub/"


def _weight_bin(path: str) -> bool:
    """``*model*.bin`` / ``*consolidated*.bin`` (pytorch_model, adapter_model too) or any
    ``.bin`` under a Hugging Face hub cache. Plain string tests: the regex these replace
    rescanned the name from every "model" in it (quadratic in a hostile member's name)."""
    if not path.endswith(".bin"):
        return False
    stem = path[path.rfind("/") + 1 : -4]
    if "model" in stem or "consolidated" in stem:
        return True
    hub = path.find(_HF_HUB)
    return hub >= 0 and hub + len(_HF_HUB) < len(path) - 4


def _weights(path: str) -> bool:
    if _SITE.search(path):
        return False
    return path.endswith(_WEIGHT_EXT) or _weight_bin(path)


def is_weight_file(path: str, size: int) -> bool:
    """A file of model weights, as the ``baked-weights`` rule and the profile tell them."""
    return size >= WEIGHT_MIN_BYTES and _weights(path)


def _build_artifact(path: str) -> bool:
    if "/.git/" in path or "/CMakeFiles/" in path or path.endswith((".o", ".obj")):
        return True
    if "/build/" not in path:
        return False
    return not (path.startswith(("/usr/", "/lib", "/opt/conda/lib/")) or _SITE.search(path))


PATH_RULES: tuple[PathRule, ...] = (
    PathRule(
        "package-caches",
        "pip/uv/conda/npm caches",
        "pip install --no-cache-dir (uv: --no-cache; conda clean -afy; npm cache clean --force) "
        "in the same RUN, or RUN --mount=type=cache,target=/root/.cache/pip",
        _regex(
            r"/\.cache/(?:pip|uv|pypoetry|yarn|pnpm)/|/\.npm/_cacache/|/\.conda/pkgs/|"
            r"^/(?:opt/)?(?:conda|miniconda3?|anaconda3?|mambaforge|miniforge3)/pkgs/"
        ),
    ),
    PathRule(
        "baked-weights",
        "model weights baked into the image",
        "fetch them at start with `spotstart fetch` to local NVMe (parallel ranged reads at "
        "the link's rate) instead of pulling them as a layer",
        lambda p: _weights(p),
    ),
    PathRule(
        "apt-lists-caches",
        "apt lists and package caches",
        "rm -rf /var/lib/apt/lists/* and apt-get clean in the same RUN as apt-get install, or "
        "RUN --mount=type=cache,target=/var/cache/apt",
        _regex(r"^/var/lib/apt/lists/(?!lock$|partial/?$)|^/var/cache/apt/.+"),
    ),
    PathRule(
        "build-artifacts",
        "build artifacts (.git, object files, build directories)",
        "list .git and build/ in .dockerignore; build in a first stage and COPY --from only the "
        "installed result",
        _build_artifact,
    ),
    PathRule(
        "profilers",
        "profilers (Nsight Systems / Compute)",
        "serving needs no profiler: start from nvidia/cuda:*-runtime, or install the "
        "cuda-libraries packages instead of the whole toolkit",
        _regex(
            r"/(?:nsight-systems|nsight-compute|NsightSystems|NsightCompute)[^/]*/|/(?:nsys|ncu)$"
        ),
    ),
    PathRule(
        "compilers-headers",
        "compilers and headers in a runtime image",
        "compile in a -devel stage and COPY the results into a -runtime stage (keep gcc and "
        "Python.h only if the server JIT-compiles: Triton kernels in vLLM and torch.compile do)",
        _regex(
            r"^/usr/(?:lib|libexec)/gcc/|^/usr/(?:local/)?include/|^/usr/local/cuda[^/]*/"
            r"(?:include/|nvvm/|bin/nvcc$|bin/ptxas$|bin/cicc$)|^/usr/bin/(?:[a-z0-9_-]+-)?"
            r"(?:gcc|g\+\+|c\+\+|cc1|cc1plus)(?:-\d+)?$"
        ),
    ),
    PathRule(
        "bytecode-outside-site-packages",
        "__pycache__/.pyc outside site-packages",
        "add __pycache__ and *.pyc to .dockerignore (they came from the build context) or set "
        "PYTHONDONTWRITEBYTECODE=1 while building",
        _pyc_outside_site,
    ),
    PathRule(
        "tests-docs-in-site-packages",
        "tests and docs inside site-packages",
        "nothing imports them at serve time: remove them in the pip install RUN "
        "(find site-packages -type d \\( -name tests -o -name docs \\) -prune -exec rm -rf {} +); "
        "check the startup profile first",
        _regex(r"/(?:site|dist)-packages/[^/]+/(?:.+/)?(?:tests|docs|doc)/"),
    ),
)


def _stem(name: str) -> str:
    return name.split(".so", 1)[0]


@dataclass
class _Bucket:
    bytes: int = 0
    files: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)
    layers: set[int] = field(default_factory=set)
    hidden: int = 0

    def add(self, inode: Inode) -> None:
        self.bytes += inode.size
        self.files += 1
        self.layers.add(inode.layer)
        if inode.links == 0:
            self.hidden += inode.size
        self.examples.append((inode.size, inode.path))


def _finish(
    rule: str, title: str, fix: str, b: _Bucket, *, counted: bool = True, note: str = ""
) -> Finding:
    examples = tuple(p for _, p in sorted(b.examples, reverse=True)[:5])
    if b.hidden and not note:
        note = (
            f"{b.hidden} of these bytes are deleted in a later layer and still pulled: "
            "delete them in the RUN that made them"
        )
    return Finding(
        rule, title, b.bytes, b.files, fix, examples, tuple(sorted(b.layers)), counted, note
    )


def evaluate(
    tree: MergedTree, options: RuleOptions, startup_paths: Iterable[str] = ()
) -> tuple[list[Finding], dict[int, str]]:
    """The findings, and which rule counts each inode (by ``id``; for the waste total)."""
    buckets: dict[str, _Bucket] = defaultdict(_Bucket)
    claimed: dict[int, str] = {}
    rest: list[Inode] = []
    for inode in tree.inodes:
        if not inode.size:
            continue
        for rule in PATH_RULES:
            if rule.match(inode.path) and (
                rule.rule != "baked-weights" or inode.size >= WEIGHT_MIN_BYTES
            ):
                buckets[rule.rule].add(inode)
                claimed[id(inode)] = rule.rule
                break
        else:
            rest.append(inode)
    findings = [
        _finish(r.rule, r.title, r.fix, buckets[r.rule])
        for r in PATH_RULES
        if buckets[r.rule].files
    ]
    for extra in (_nvidia_duplicates, _torch, _frameworks):
        for finding, inodes in extra(tree, rest, options):
            findings.append(finding)
            if finding.counted:
                claimed.update((id(i), finding.rule) for i in inodes)
            taken = {id(x) for x in inodes}
            rest = [i for i in rest if id(i) not in taken]
    triton = _triton(rest, options, set(startup_paths))
    if triton is not None:
        finding, inodes = triton
        findings.append(finding)
        if finding.counted:
            claimed.update((id(i), finding.rule) for i in inodes)
    return findings, claimed


Extra = list[tuple[Finding, list[Inode]]]


def _nvidia_duplicates(tree: MergedTree, rest: list[Inode], options: RuleOptions) -> Extra:
    cuda_stems = {
        _stem(path.rsplit("/", 1)[-1])
        for path, node in tree.walk()
        if _CUDA_ROOT.match(path)
        and ".so" in path.rsplit("/", 1)[-1]
        and node.kind in ("file", "symlink")
    }
    if not cuda_stems:
        return []
    dup = [
        i
        for i in rest
        if re.search(r"/(?:site|dist)-packages/nvidia/[^/]+/lib/[^/]+\.so", i.path)
        and _stem(i.path.rsplit("/", 1)[-1]) in cuda_stems
    ]
    if not dup:
        return []
    b = _Bucket()
    for i in dup:
        b.add(i)
    return [
        (
            _finish(
                "nvidia-wheels-duplicate-cuda",
                "nvidia-* wheels duplicating the base image's /usr/local/cuda",
                "keep one copy: start from a base without the CUDA libraries (nvidia/cuda:*-base "
                "or a plain distro image: torch's wheels bring the ones it loads), or drop the "
                "base's toolkit",
                b,
            ),
            dup,
        )
    ]


def _site_root(path: str, package: str) -> str | None:
    m = re.search(rf"^(.*/(?:site|dist)-packages)/{package}/", path)
    return m.group(1) if m else None


def _torch(tree: MergedTree, rest: list[Inode], options: RuleOptions) -> Extra:
    out: Extra = []
    roots: dict[str, list[Inode]] = defaultdict(list)
    for i in rest:
        root = _site_root(i.path, "torch")
        if root is not None:
            roots[root].append(i)
    visible = {r: v for r, v in roots.items() if any(i.links for i in v)}
    extra: list[Inode] = [i for v in roots.values() for i in v if i.links == 0]
    if len(visible) > 1:
        keep = max(visible, key=lambda r: sum(i.size for i in visible[r]))
        extra += [i for r, v in visible.items() if r != keep for i in v if i.links]
    if extra:
        b = _Bucket()
        for i in extra:
            b.add(i)
        out.append(
            (
                _finish(
                    "two-torches",
                    "more than one torch (installed twice, or reinstalled over an earlier one)",
                    "install torch once, in one environment and one RUN: pin it in the same "
                    "requirements file as what depends on it, so pip does not replace it",
                    b,
                ),
                extra,
            )
        )
    if options.target == "cpu":
        cuda = [
            i
            for i in rest
            if i not in extra
            and (
                re.search(
                    r"/torch/lib/[^/]*(?:cuda|cudnn|nccl|cublas|cusparse|cufft|nvrtc)[^/]*$", i.path
                )
                or re.search(r"/(?:site|dist)-packages/(?:nvidia|triton)/", i.path)
            )
        ]
        if cuda:
            b = _Bucket()
            for i in cuda:
                b.add(i)
            out.append(
                (
                    _finish(
                        "torch-cuda-on-cpu",
                        "a CUDA torch (with nvidia-* and triton wheels) in an image serving on CPU",
                        "pip install torch --index-url https://download.pytorch.org/whl/cpu",
                        b,
                    ),
                    cuda,
                )
            )
    return out


_FRAMEWORKS = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow",),
    "jax": ("jax", "jaxlib"),
    "paddle": ("paddle",),
    "mxnet": ("mxnet",),
}


def _frameworks(tree: MergedTree, rest: list[Inode], options: RuleOptions) -> Extra:
    sizes: dict[str, list[Inode]] = defaultdict(list)
    pattern = re.compile(r"/(?:site|dist)-packages/([^/]+)/")
    owner = {pkg: fw for fw, pkgs in _FRAMEWORKS.items() for pkg in pkgs}
    for i in rest:
        if i.links == 0:
            continue
        m = pattern.search(i.path)
        if m and m.group(1) in owner:
            sizes[owner[m.group(1)]].append(i)
    if len(sizes) < 2:
        return []
    keep = max(sizes, key=lambda fw: sum(i.size for i in sizes[fw]))
    extra = [i for fw, v in sizes.items() if fw != keep for i in v]
    b = _Bucket()
    for i in extra:
        b.add(i)
    others = ", ".join(sorted(fw for fw in sizes if fw != keep))
    return [
        (
            _finish(
                "several-frameworks",
                f"several deep-learning frameworks at once ({keep} and {others})",
                f"serve with one framework ({keep} is the largest here); move {others} to "
                "another image or drop the dependency that pulls it in",
                b,
            ),
            extra,
        )
    ]


def _triton(
    rest: list[Inode], options: RuleOptions, startup: set[str]
) -> tuple[Finding, list[Inode]] | None:
    backends: dict[str, list[Inode]] = defaultdict(list)
    for i in rest:
        m = re.match(r"^/opt/tritonserver/backends/([^/]+)/", i.path)
        if m:
            backends[m.group(1)].append(i)
    if not backends:
        return None
    used: set[str] | None = (
        set(options.triton_backends) if options.triton_backends is not None else None
    )
    profiled = {
        m.group(1) for p in startup if (m := re.match(r"^/opt/tritonserver/backends/([^/]+)/", p))
    }
    if profiled:
        used = (used or set()) | profiled
    unused = [i for name, v in backends.items() if used is None or name not in used for i in v]
    if not unused:
        return None
    b = _Bucket()
    for i in unused:
        b.add(i)
    names = sorted(n for n in backends if used is None or n not in used)
    note = (
        ""
        if used is not None
        else (
            "which backends the models use is not known: pass --triton-backends (or a startup "
            "profile) and this finding counts"
        )
    )
    return _finish(
        "triton-backends-unused",
        f"Triton backends the models do not use ({', '.join(names)})",
        "copy only the backends your models name (config.pbtxt backend/platform) into "
        "/opt/tritonserver/backends, or build with compose.py --backend",
        b,
        counted=used is not None,
        note=note,
    ), unused
