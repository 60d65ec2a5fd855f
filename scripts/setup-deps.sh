#!/usr/bin/env bash
# Install what building and testing kvattn needs and is missing; quick (well under a second) when
# everything is present, so `make test` runs it every time.
#   Debian packages: a C compiler with ASan/UBSan, make, cmake, pkg-config, binutils (readelf, nm),
#                    python3 with venv
#   Python packages: numpy, pytest (the binding's test suite); setuptools, wheel (pip install ./python)
# apt-get update runs only when a package has to be installed. Nothing CUDA is needed: kvattn loads
# the driver and NVRTC at run time when they are there.
set -euo pipefail

missing=()
need_cmd() { # need_cmd COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need_cmd cc gcc
need_cmd gcc gcc
need_cmd make make
need_cmd cmake cmake
need_cmd ctest cmake
need_cmd pkg-config pkg-config
need_cmd readelf binutils
need_cmd nm binutils
need_cmd python3 python3

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "setup-deps: missing Debian packages $* and not root (no sudo): install them first" >&2
      exit 1
    fi
  fi
  echo "setup-deps: installing Debian packages: $*"
  # The package lists may be absent or stale on a fresh machine: update once, then install.
  if [ -z "${apt_updated:-}" ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# The install test makes a venv to `pip install ./python`: Debian splits venv/ensurepip out.
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  uniq_missing=($(printf '%s\n' "${missing[@]}" | sort -u))
  apt_install "${uniq_missing[@]}"
fi

# Debian's gcc only recommends the C library headers (libc6-dev) and the sanitizer runtimes
# (libasan8, libubsan1, liblsan0), so an install without recommends lacks them: probe two links.
if command -v gcc >/dev/null 2>&1; then
  probe_dir=$(mktemp -d)
  trap 'rm -rf "$probe_dir"' EXIT
  printf '#include <stdio.h>\n#include <math.h>\n#include <pthread.h>\n#include <dlfcn.h>\nint main(void) { return 0; }\n' \
    > "$probe_dir/p.c"
  if ! gcc "$probe_dir/p.c" -o "$probe_dir/p" -lm -lpthread -ldl >/dev/null 2>&1; then
    apt_install libc6-dev
  fi
  if ! gcc -fsanitize=address,undefined "$probe_dir/p.c" -o "$probe_dir/p" -lm -lpthread -ldl >/dev/null 2>&1; then
    apt_install libasan8 libubsan1 liblsan0
  fi
fi

# Python: numpy and pytest for python/tests; setuptools and wheel so that the install test's
# `pip install --no-build-isolation ./python` builds offline (setuptools < 70.1 needs wheel for it).
# Prefer pip (the interpreter on PATH, which may be a pyenv or a venv one); a Debian system Python
# refuses pip (PEP 668), so fall back to its packages.
if ! python3 -c 'import numpy, pytest, setuptools, wheel' >/dev/null 2>&1; then
  echo "setup-deps: installing numpy, pytest, setuptools, wheel for $(command -v python3)"
  if ! python3 -m pip install --quiet --disable-pip-version-check numpy pytest setuptools wheel; then
    apt_install python3-numpy python3-pytest python3-setuptools python3-wheel
  fi
  python3 -c 'import numpy, pytest, setuptools, wheel' ||
    { echo "setup-deps: numpy/pytest/setuptools/wheel still not importable" >&2; exit 1; }
fi
exit 0
