PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: deps ffi launcher test test-fast differential demo kmod test-kmod bench bench-door bench-flavors bench-rulesets bench-ipv6 bench-linear bench-cplane fuzz-deps reliability reliability-long clean

deps:
	sh tools/install-deps.sh

# kernel.py's C declarations stored parsed (cffi's out-of-line ABI mode): run after editing
# bpfilter_umh/kernel_cdef.py (tests/test_kernel_ffi.py fails until then; the helper meanwhile
# parses the declarations at its start, as without the file)
ffi:
	$(PYTHON) tools/gen_kernel_ffi.py

# bpfilter exec without Python's start-up (bin/bpfilter-exec.c): hands the door to the running
# helper; the filter it installs is door.py's, written out as a C initializer
launcher: build/bpfilter-exec

build/door_filter.h: bpfilter_umh/door.py
	mkdir -p build
	$(PYTHON) -S -c 'from bpfilter_umh.door import filter_c_initializer as f; print(f(), end="")' > $@.tmp
	mv $@.tmp $@

# linked statically where the toolchain can (a static libc): every command through the launcher
# then starts without ld.so mapping and relocating libc, ~0.3 ms of its ~2 ms (measured on a
# `-- true`); dynamically otherwise. Probed when the launcher is built, not at every make
# (and the launcher rebuilt when this file changes its flags).
LAUNCHER_STATIC = $(shell printf 'int main(void){return 0;}\n' | \
	$(CC) -static -x c - -o /dev/null 2>/dev/null && echo -static)

# The fallback door (no helper running yet: the cold start) runs the interpreter the build ran,
# by its own path: `python3` looked up in PATH can be a wrapper (pyenv's shim is a bash script
# that costs ~140 ms per start here, more than the helper's whole cold command) or another
# Python without the package's dependencies.
LAUNCHER_PYTHON = $(or $(shell $(PYTHON) -c 'import sys; print(sys.executable)'),$(PYTHON))

build/bpfilter-exec: bin/bpfilter-exec.c kmod/bpfilter_msg.h build/door_filter.h Makefile
	$(CC) -O2 -Wall -Wextra $(LAUNCHER_STATIC) -I kmod -I build \
		-DBPFILTER_ROOT='"$(CURDIR)"' -DBPFILTER_PYTHON='"$(LAUNCHER_PYTHON)"' \
		-o $@ bin/bpfilter-exec.c

# The README's test command: installs what it needs, then runs every test on the real kernel.
test: deps
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-fast: deps
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The differential suites alone: kernel iptables-legacy (oracle) vs bpfilter on real traffic
differential: deps
	$(PYTHON) -m pytest -q tests/test_lab.py tests/test_differential_handwritten.py \
		tests/test_differential_generated.py tests/test_differential_door.py

# The README's main job.
demo: deps
	$(PYTHON) -m bpfilter_umh.demo

# bpfilter.ko against Debian's kernel (image + headers fetched into build/kmod on first use)
kmod:
	$(MAKE) -C kmod

# boot that kernel under qemu (TCG) and drive the unmodified iptables binaries through the module
test-kmod: deps
	$(MAKE) -C kmod test PYTHON=$(PYTHON)

# the fuzz steps of both forms run atheris (libFuzzer): installed here, as deps installs the rest
fuzz-deps: deps
	$(PYTHON) -c 'import atheris' 2>/dev/null || $(PYTHON) -m pip install -q atheris

# issue #9: kills, replacements under load, injected faults, fuzzing, invocations; counts survivors
reliability: fuzz-deps
	$(PYTHON) tools/reliability.py

# the long form: 1000 swaps, 10 000 invocations, 1M decoder + 1M request fuzz inputs (atheris)
reliability-long: fuzz-deps
	$(PYTHON) tools/reliability.py --long

# Benchmarks (not tests): ratios measured side by side in one run
bench: bench-door bench-flavors bench-rulesets bench-ipv6 bench-linear bench-cplane

bench-door: deps launcher
	$(PYTHON) bench/door_bench.py

bench-flavors: deps
	$(PYTHON) bench/flavor_bench.py

# N = 10..10 000 per ruleset shape, kernel vs each flavor; writes bench/results.md and the plot
# (the control plane three times per row, medians: one run swings by tens of percent here)
bench-rulesets: deps launcher
	$(PYTHON) -c 'import matplotlib' 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	$(PYTHON) bench/ruleset_bench.py --repeat 3 --md bench/results.md --plot bench/cost_vs_n.png

# an IPv6 prefix blocklist, N = 10..10 000: test-run, side by side, restore and append vs the kernel
bench-ipv6: deps launcher
	$(PYTHON) bench/ipv6_bench.py

# chains no classified run takes: linear code cut into global functions (stretch.py)
bench-linear: deps launcher
	$(PYTHON) bench/linear_bench.py

# where one SET_REPLACE's time goes at 10 000 rules, per shape (restore, then appends); then a
# helper through restores of other rulesets and resyncs (time and resident size after each)
bench-cplane: deps
	$(PYTHON) bench/cplane_bench.py --series 6

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -exec rm -rf {} +
