# kvattn — the two commands of the README, and a few more.
#
#   make            build (Release) into build/
#   make demo       build, then run `build/kvattn demo` (one verified serving step)
#   make test       install what is missing (scripts/setup-deps.sh), build, run every test this
#                   machine can run (scripts/run-tests.sh); the last line is "N passed, N failed"
#   make sanitize   build build-asan/ with ASan+UBSan and run the C tests there
#   make install PREFIX=/usr/local
#   make clean
#
# CMake does the real work; this file only names the build directories and the order.

BUILD      ?= build
ASAN_BUILD ?= build-asan
PREFIX     ?= /usr/local
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE      ?= cmake
CMAKE_ARGS ?=

# CMake's own makefiles run under this make: keep their output to the build lines.
MAKEFLAGS += --no-print-directory

.PHONY: all build demo test sanitize install clean

all: build

# Configuring again is cheap (CMake only regenerates what changed), and it picks up new files
# (the source lists are globs with CONFIGURE_DEPENDS).
build:
	$(CMAKE) -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	$(CMAKE) --build $(BUILD) -j $(JOBS)

demo: build
	./$(BUILD)/kvattn demo

test:
	scripts/setup-deps.sh
	$(MAKE) build
	scripts/run-tests.sh

# RelWithDebInfo keeps line numbers in the sanitizer reports; the library objects are -O3 anyway.
# The GPU tests are left out (compute-sanitizer checks them: scripts/gpu-check.sh).
sanitize:
	$(CMAKE) -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVATTN_SANITIZE=ON -DKVATTN_BUILD_TOOLS=ON $(CMAKE_ARGS)
	$(CMAKE) --build $(ASAN_BUILD) -j $(JOBS)
	ASAN_OPTIONS=$${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1} \
	UBSAN_OPTIONS=$${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
	  ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS) -LE gpu

install: build
	$(CMAKE) --install $(BUILD) --prefix $(PREFIX)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
