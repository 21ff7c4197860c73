# Sourced by build.sh and lock.sh: pip's flags for wheels of the image's Python (Debian
# bookworm's CPython 3.11, glibc 2.36, x86_64), whatever Python runs pip on this host.
# Binary wheels only: nothing is compiled for the image.
PIP_TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311)
for minor in $(seq 36 -1 17); do PIP_TARGET+=(--platform "manylinux_2_${minor}_x86_64"); done
PIP_TARGET+=(--platform manylinux2014_x86_64)  # pip adds manylinux2010 and manylinux1
