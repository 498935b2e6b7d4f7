# Isthmus — the README's commands. Each target does its own set-up on a fresh Debian 12 machine
# (as root): apt packages, the wheel cache and .venv (image/lab/setup-host.sh), and the lab VM's
# root filesystem (image/lab/build-rootfs.sh, cached under $(ISTHMUS_CACHE) by a hash of its inputs).

SHELL := /bin/bash
export ISTHMUS_CACHE ?= /var/cache/isthmus
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup lab-image image-tools image image-test image-aws image-gcp image-azure image-base test test-unit test-host test-lab demo lab bench fuzz clean distclean

help:
	@echo "make demo   - boot the lab: two isthmusd regions negotiate a tunnel; LAN A pings and sends a file to LAN B"
	@echo "make test   - every test tier: unit, host (network namespaces), lab (VM with a real IPsec kernel)"
	@echo "make lab    - boot the lab with a shell, or run CMD='...' in it"
	@echo "make bench  - benchmarks, printed as ratios against an anchor measured in the same run"
	@echo "make fuzz   - fuzz the IKE engine: CASES=N and/or SECONDS=S (default 100000 cases), SEED=, JOBS="
	@echo "make image  - the appliance image: build/image/isthmus-VERSION.qcow2 (+ .sha256, .manifest.txt); see docs/image.md"
	@echo "make image-test - boot two copies of the image (qemu socket network, NoCloud seeds): tunnel, ping, management policy"
	@echo "make image-aws / image-gcp / image-azure - the image converted for that cloud's import"
	@echo "make clean  - remove build output and .venv (the cache in $(ISTHMUS_CACHE) stays)"

setup:
	@image/lab/setup-host.sh >/dev/null

lab-image: setup
	@$(PY) -m image.lab.runner build >/dev/null

# The appliance image (docs/image.md). Minutes under TCG: never part of `make test`.
IMAGE_OUT := build/image
IMAGE := $(IMAGE_OUT)/isthmus.qcow2

image-tools:
	@command -v packer >/dev/null && command -v sfdisk >/dev/null && command -v mkfs.vfat >/dev/null \
	  && command -v mkisofs >/dev/null || { echo "image: apt-get install packer fdisk dosfstools mtools genisoimage ovmf" >&2; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends packer fdisk dosfstools mtools genisoimage ovmf >/dev/null; }

image-base: setup image-tools
	@image/build-base.sh

image: setup image-tools
	@image/build-image.sh "$$(image/lab/setup-host.sh)" $(IMAGE_OUT)

# Two copies of the image on a qemu socket network, configured by their NoCloud seeds alone:
# the tunnel, a ping over the XFRM interfaces, the management policy; then B with a bad config.
image-test:
	@[ -f $(IMAGE) ] || $(MAKE) image
	@echo "== image-test: one copy booted by UEFI (OVMF)"; python3 image/image_test.py --uefi $(IMAGE)
	@echo "== image-test: two appliances from cloud-init"; python3 image/image_test.py $(IMAGE)
	@echo "== image-test: region B with a bad config"; python3 image/image_test.py --bad-config --timeout 600 $(IMAGE)

image-aws image-gcp image-azure:
	@[ -f $(IMAGE) ] || $(MAKE) image
	@image/convert.sh $(@:image-%=%) $(IMAGE) $(IMAGE_OUT)

test: lab-image
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-host: setup
	$(PY) -m pytest tests/unit tests/host $(PYTEST_ARGS)

test-lab: lab-image
	$(PY) -m pytest tests/lab $(PYTEST_ARGS)

demo: lab-image
	$(PY) -m image.lab.runner run -- python3 image/lab/demo.py

lab: lab-image
ifdef CMD
	$(PY) -m image.lab.runner run -- '$(CMD)'
else
	$(PY) -m image.lab.runner shell
endif

# Benchmarks: tests/bench/host_*.py run on the host, tests/bench/lab_*.py in one lab boot. Each
# prints its result as a ratio against an anchor it measures in the same run.
bench: lab-image
	@set -e; for b in tests/bench/host_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) "$$b"; done
	@labs=$$(ls tests/bench/lab_*.py 2>/dev/null | tr '\n' ' '); \
	 if [ -n "$$labs" ]; then $(PY) -m image.lab.runner run -- "set -e; for b in $$labs; do echo \"== \$$b\"; python3 \$$b; done"; fi

# The IKE engine fuzzer (tests/fuzz): hostile datagrams against live simnet conversations.
# Prints cases run, cases/s, unique failures with a reproducer each, RSS at start and end.
FUZZ_SEED := $(if $(SEED),$(SEED),1)
FUZZ_JOBS := $(if $(JOBS),$(JOBS),2)
FUZZ_LIMIT := $(if $(CASES),--cases $(CASES)) $(if $(SECONDS),--seconds $(SECONDS))
fuzz: setup
	$(PY) -m tests.fuzz --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS) $(if $(strip $(FUZZ_LIMIT)),$(FUZZ_LIMIT),--cases 100000)

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(ISTHMUS_CACHE)/lab $(ISTHMUS_CACHE)/wheels $(ISTHMUS_CACHE)/image
