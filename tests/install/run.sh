#!/usr/bin/env bash
# The install test: install a built kvattn into a temporary prefix and use it as a user would.
#   1. `cmake --install` lays out headers, both libraries (SONAME libkvattn.so.MAJOR), kvattn.pc,
#      the CMake package and the CLI.
#   2. The shared library needs no CUDA library at link time and exports only kvattn_* symbols.
#   3. Every examples/*.c builds with `pkg-config --cflags --libs kvattn` (shared) and
#      `pkg-config --static` (static), and runs.
#   4. The same examples build with a CMake project using find_package(kvattn) -> kvattn::kvattn and
#      kvattn::kvattn_static, from the install prefix and from the build tree, and run.
#   5. The Python examples run on the installed library (after `pip install ./python` into a venv
#      when python/ is a package).
#   6. find_package(kvattn <next major>) is refused (SameMajorVersion).
# Usage: tests/install/run.sh [BUILD_DIR]   (default: build). Prints "N passed, N failed" last.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(cd "${1:-$ROOT/build}" && pwd) || { echo "install test: no build dir"; echo "0 passed, 1 failed"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvattn-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PREFIX=$WORK/prefix
LOG=$WORK/log
CC=${CC:-cc}
passed=0
failed=0

# check NAME COMMAND...: runs the command with its output in $LOG; prints the log on failure.
check() {
  local name=$1; shift
  if "$@" >"$LOG" 2>&1; then
    passed=$((passed + 1)); echo "[  OK  ] $name"
  else
    failed=$((failed + 1)); echo "[ FAIL ] $name"; sed 's/^/    /' "$LOG" | tail -40
  fi
}

examples=("$ROOT"/examples/*.c)
[ -e "${examples[0]}" ] || examples=()

# 1. Install, and the layout.
check "cmake --install into a temporary prefix" cmake --install "$BUILD" --prefix "$PREFIX"
layout() {
  local missing=0
  for f in include/kvattn.h include/kvattn_dlpack.h lib/libkvattn.a lib/libkvattn.so \
           lib/pkgconfig/kvattn.pc lib/cmake/kvattn/kvattnConfig.cmake \
           lib/cmake/kvattn/kvattnConfigVersion.cmake lib/cmake/kvattn/kvattnTargets.cmake; do
    [ -e "$PREFIX/$f" ] || { echo "missing $PREFIX/$f"; missing=1; }
  done
  # The CLI is there when this build made it (KVATTN_BUILD_TOOLS, the default, and tools/kvattn.c).
  if [ -e "$ROOT/tools/kvattn.c" ] && grep -q '^KVATTN_BUILD_TOOLS:BOOL=ON' "$BUILD/CMakeCache.txt" &&
     [ ! -x "$PREFIX/bin/kvattn" ]; then echo "missing bin/kvattn"; missing=1; fi
  ls -lR "$PREFIX"
  return $missing
}
check "installed layout: headers, libkvattn.so/.a, kvattn.pc, CMake package, bin/kvattn" layout
if [ "$failed" -ne 0 ]; then
  echo "install test: the install failed; nothing further can be checked"
  echo "$passed passed, $failed failed"
  exit 1
fi

soname() {
  local so
  so=$(readelf -d "$PREFIX/lib/libkvattn.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
  echo "SONAME: $so"
  [[ "$so" =~ ^libkvattn\.so\.[0-9]+$ ]] && [ -e "$PREFIX/lib/$so" ]
}
check "SONAME is libkvattn.so.MAJOR and installed" soname

no_cuda() {
  readelf -d "$PREFIX/lib/libkvattn.so" | grep NEEDED || return 1
  ! readelf -d "$PREFIX/lib/libkvattn.so" | grep NEEDED | grep -Eiq 'cuda|nvrtc|nvidia'
}
check "libkvattn.so has no link-time dependency on CUDA (NEEDED entries)" no_cuda

exports() {
  local bad
  nm -D --defined-only "$PREFIX/lib/libkvattn.so" >/dev/null || return 1
  bad=$(nm -D --defined-only "$PREFIX/lib/libkvattn.so" | awk '$2 ~ /^[TDBRV]$/ {print $3}' | grep -v '^kvattn_' || true)
  nm -D --defined-only "$PREFIX/lib/libkvattn.so" | awk '$2 ~ /^[TDBRV]$/ {print $3}' | head -50
  [ -z "$bad" ] || { echo "exported symbols outside kvattn_*: $bad"; return 1; }
}
check "libkvattn.so exports only kvattn_* symbols" exports

if [ ${#examples[@]} -eq 0 ]; then
  failed=$((failed + 1)); echo "[ FAIL ] no examples/*.c to build against the installed kvattn"
fi

# 3. pkg-config, shared and static.
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
check "pkg-config --modversion kvattn matches the header" \
  bash -c "v=\$(pkg-config --modversion kvattn) && echo \$v && grep -q \"KVATTN_VERSION_STRING \\\"\$v\\\"\" '$PREFIX/include/kvattn.h'"
for src in "${examples[@]}"; do
  name=$(basename "$src" .c)
  # shellcheck disable=SC2046
  check "pkg-config: build $name (shared)" \
    $CC -std=c11 -Wall -Werror "$src" -o "$WORK/${name}_pc" $(pkg-config --cflags --libs kvattn) -lm \
        -Wl,-rpath,"$PREFIX/lib"
  check "pkg-config: run $name (shared)" "$WORK/${name}_pc"
  # shellcheck disable=SC2046
  check "pkg-config --static: build $name (libkvattn.a)" \
    $CC -std=c11 -Wall -Werror $(pkg-config --cflags kvattn) "$src" -o "$WORK/${name}_pc_static" \
        -L"$PREFIX/lib" -Wl,-Bstatic -lkvattn -Wl,-Bdynamic $(pkg-config --static --libs-only-l kvattn | sed 's/-lkvattn//') -lm
  check "pkg-config --static: run $name (no libkvattn.so needed)" \
    bash -c "! readelf -d '$WORK/${name}_pc_static' | grep -q libkvattn && '$WORK/${name}_pc_static'"
done

# The header is usable from C++ (extern "C", no C-only constructs in declarations or macros).
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
  printf '#include <kvattn.h>\n#include <cstdio>\nint main() {\n  kvattn_options o = KVATTN_OPTIONS_INIT;\n  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;\n  kvattn_context *ctx = nullptr;\n  o.backend = KVATTN_BACKEND_CPU;\n  if (kvattn_context_create(&o, &ctx) != KVATTN_SUCCESS) return 1;\n  std::printf("%%s %%d\\n", kvattn_version(), d.window_left);\n  return kvattn_context_destroy(ctx) == KVATTN_SUCCESS && kvattn_version_number() == KVATTN_VERSION_NUMBER ? 0 : 1;\n}\n' > "$WORK/cxx.cc"
  # shellcheck disable=SC2046
  check "C++: kvattn.h compiles as C++11 (-Wall -Wextra -pedantic -Werror), links and runs" \
    bash -c "${CXX:-c++} -std=c++11 -Wall -Wextra -pedantic -Werror '$WORK/cxx.cc' -o '$WORK/cxx' \$(pkg-config --cflags --libs kvattn) -Wl,-rpath,'$PREFIX/lib' && '$WORK/cxx'"
else
  echo "[ SKIP ] C++ header check: no C++ compiler here"
fi

# 4. find_package(kvattn), from the prefix and from the build tree.
consume() { # consume LABEL CMAKE_ARGS...
  local label=$1; shift
  local out=$WORK/consumer-$label
  check "find_package(kvattn) from the $label: configure" \
    cmake -S "$ROOT/tests/install/consumer" -B "$out" -DEXAMPLES_DIR="$ROOT/examples" "$@"
  check "find_package(kvattn) from the $label: build" cmake --build "$out" -j 2
  for src in "${examples[@]}"; do
    name=$(basename "$src" .c)
    check "find_package(kvattn) from the $label: run $name with kvattn::kvattn" "$out/${name}_shared"
    check "find_package(kvattn) from the $label: run $name with kvattn::kvattn_static" "$out/${name}_static"
  done
}
if [ ${#examples[@]} -gt 0 ]; then
  consume "install prefix" -DCMAKE_PREFIX_PATH="$PREFIX"
  consume "build tree" -Dkvattn_DIR="$BUILD"
fi

# 5. Python: the package installed with pip into a fresh venv (when python/ is packaged), run on the
#    installed library, from outside the checkout; else straight from the checkout. examples/*.py run.
pyexamples=("$ROOT"/examples/*.py)
[ -e "${pyexamples[0]}" ] || pyexamples=()
PYTHON=${PYTHON:-python3}
if [ ${#pyexamples[@]} -gt 0 ] && command -v "$PYTHON" >/dev/null; then
  py=$PYTHON
  pypath="$ROOT/python"
  if [ -f "$ROOT/python/pyproject.toml" ] || [ -f "$ROOT/python/setup.py" ]; then
    # --system-site-packages: numpy (and the build backend) come from the interpreter's own site.
    pip_install() {
      "$PYTHON" -m venv --system-site-packages "$WORK/venv" || return 1
      # Without build isolation pip needs no network; with it (backend not installed) it fetches one.
      "$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
          --no-build-isolation "$ROOT/python" ||
        "$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$ROOT/python"
    }
    check "pip install ./python into a venv" pip_install
    py=$WORK/venv/bin/python
    pypath=""
  fi
  for src in "${pyexamples[@]}"; do
    check "python: run $(basename "$src") on the installed libkvattn.so" \
      env -C "$WORK" PYTHONPATH="$pypath" KVATTN_LIBRARY="$PREFIX/lib/libkvattn.so" "$py" "$src"
  done
fi

# 6. A request for the next major version must be refused.
major_refused() {
  local major next
  major=$(sed -n 's/^#define KVATTN_VERSION_MAJOR \([0-9]*\).*/\1/p' "$PREFIX/include/kvattn.h")
  next=$((major + 1))
  mkdir -p "$WORK/major"
  printf 'cmake_minimum_required(VERSION 3.18)\nproject(m LANGUAGES C)\nfind_package(kvattn %s REQUIRED)\n' "$next" \
    > "$WORK/major/CMakeLists.txt"
  ! cmake -S "$WORK/major" -B "$WORK/major/out" -DCMAKE_PREFIX_PATH="$PREFIX"
}
check "find_package(kvattn <major+1>) is refused (SameMajorVersion)" major_refused

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
