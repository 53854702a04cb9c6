# weightd: plain make. `make help` lists the targets and switches.

PREFIX    ?= /usr/local
BINDIR    ?= $(PREFIX)/bin
SBINDIR   ?= $(PREFIX)/sbin
# The config file is /etc/weightd/weightd.conf whatever the PREFIX: the unit
# names it, and a system daemon's configuration lives in /etc.
SYSCONFDIR ?= /etc
MANDIR    ?= $(PREFIX)/share/man
LIBDIR    ?= $(PREFIX)/lib
INCDIR    ?= $(PREFIX)/include
PCDIR     ?= $(LIBDIR)/pkgconfig
UNITDIR   ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
# The Python client: the folder under PREFIX where this python3 looks for
# packages (Debian's dist-packages), else the standard one.
PYDIR     ?= $(shell python3 -c 'import sys, sysconfig; p = [d for d in sys.path if d.startswith("$(PREFIX)/lib/") \
                 and d.endswith("-packages")]; print(p[0] if p else sysconfig.get_path("purelib", "posix_prefix", \
                 vars={"base": "$(PREFIX)", "platbase": "$(PREFIX)"}))' 2>/dev/null)
DESTDIR   ?=
VERSION   := 0.1.0

WITH_CUDA ?= auto
CUDA_HOME ?= /usr/local/cuda
SANITIZE  ?=
V         ?= 0

RELEASE   ?= 0

# A sanitizer build lives in its own folder so that both can coexist, and
# so does a release build (RELEASE=1: no test-only fault hooks, common/fault.h).
ifneq ($(RELEASE),0)
BUILD ?= build-release
else ifeq ($(SANITIZE),)
BUILD ?= build
else
BUILD ?= build-san
endif

CC      ?= cc
PKGS    := libuv libcjson libsystemd libxxhash
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CHECK_CFLAGS := $(shell pkg-config --cflags check 2>/dev/null)
CHECK_LIBS   := $(shell pkg-config --libs check 2>/dev/null)

OPT ?= -O2
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -fPIC -MMD -MP -D_GNU_SOURCE -DWD_VERSION='"$(VERSION)"' -I. $(PKG_CFLAGS)
LDLIBS  += $(PKG_LIBS) -lpthread -lm -ldl
ifneq ($(RELEASE),0)
CFLAGS  += -DWD_RELEASE
endif

ifneq ($(SANITIZE),)
CFLAGS  += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS += -fsanitize=$(SANITIZE)
endif

# CUDA: detected once. auto = use it when $(CUDA_HOME)/include/cuda.h exists.
CUDA_FOUND := $(if $(wildcard $(CUDA_HOME)/include/cuda.h),yes,no)
ifeq ($(WITH_CUDA),auto)
USE_CUDA := $(CUDA_FOUND)
else ifeq ($(WITH_CUDA),yes)
USE_CUDA := yes
ifeq ($(CUDA_FOUND),no)
$(error WITH_CUDA=yes but $(CUDA_HOME)/include/cuda.h is missing; set CUDA_HOME)
endif
else
USE_CUDA := no
endif
ifeq ($(USE_CUDA),yes)
# Only headers and a define: nothing links libcuda, so every program starts on
# machines without a driver (CI); common/cuda_driver.c opens it at run time.
CUDA_CFLAGS := -DWD_WITH_CUDA=1 -I$(CUDA_HOME)/include
CUDA_REPORT := CUDA: yes ($(CUDA_HOME), WITH_CUDA=$(WITH_CUDA))
else
CUDA_REPORT := CUDA: no (WITH_CUDA=$(WITH_CUDA), $(CUDA_HOME)/include/cuda.h $(if $(filter yes,$(CUDA_FOUND)),found,not found))
endif
CFLAGS += $(CUDA_CFLAGS)

ifeq ($(V),0)
Q := @
msg = @printf '  %-7s %s\n' $(1) $(2);
else
Q :=
msg =
endif

# Sources by folder: the folders are the architecture.
CUDA_SRC    := allocator/backend_cuda.c common/cuda_driver.c
NO_CUDA_SRC := $(if $(filter yes,$(USE_CUDA)),,$(CUDA_SRC))
COMMON_SRC  := $(filter-out $(NO_CUDA_SRC),$(wildcard common/*.c))
ALLOC_SRC   := $(filter-out allocator/replay.c $(NO_CUDA_SRC),$(wildcard allocator/*.c))
LOADER_SRC  := $(filter-out loader/mkckpt.c,$(wildcard loader/*.c))
PROTO_SRC   := $(wildcard proto/*.c)
DAEMON_SRC  := $(filter-out daemon/main.c,$(wildcard daemon/*.c))
CLIENT_SRC  := client/client.c client/attach.c
CTL_SRC     := $(filter-out $(CLIENT_SRC),$(wildcard client/*.c))
UNIT_SRC    := $(wildcard tests/unit/*.c)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

CORE_OBJ   := $(call obj,$(COMMON_SRC) $(ALLOC_SRC) $(LOADER_SRC) $(PROTO_SRC))
DAEMON_OBJ := $(call obj,$(DAEMON_SRC))
CLIENT_OBJ := $(call obj,$(CLIENT_SRC) $(PROTO_SRC) $(COMMON_SRC) loader/checkpoint.c loader/safetensors.c)
# libweightd-torch.so: the allocator and what it needs, behind pytorch/'s front end.
TORCH_OBJ  := $(call obj,pytorch/torch_allocator.c $(ALLOC_SRC) common/errors.c common/size.c common/fault.c \
                $(filter common/cuda_driver.c,$(COMMON_SRC)))

BINS := $(BUILD)/weightd $(BUILD)/weightctl $(BUILD)/weightd-replay $(BUILD)/weightd-mkckpt
USER_BINS := $(filter-out $(BUILD)/weightd,$(BINS))
LIBS := $(BUILD)/libweightd-client.so.0 $(BUILD)/libweightd-client.so $(BUILD)/libweightd-client.a \
        $(BUILD)/weightd-client.pc $(BUILD)/libweightd-torch.so
UNIT := $(BUILD)/tests/unit-tests

# What make install puts in /etc and the units: generated here, from the
# option table (weightd --print-config) and the install paths.
ETC := $(BUILD)/etc/weightd.conf $(BUILD)/etc/weightd.service

.PHONY: all config test unit e2e install uninstall clean help demo bench bench-gpu gpu-test bench-load bench-attach bench-sleep \
        bench-integrity bench-conns bench-torch-alloc fuzz-live man deb test-systemd
all: config $(BINS) $(LIBS) $(ETC)

config:
	@echo "weightd $(VERSION): $(CUDA_REPORT); build in $(BUILD)$(if $(SANITIZE), with -fsanitize=$(SANITIZE))"

$(BUILD)/obj/%.o: %.c Makefile
	@mkdir -p $(dir $@)
	$(call msg,CC,$<)$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/tests/unit/%.o: CFLAGS += $(CHECK_CFLAGS)

$(BUILD)/weightd: $(call obj,daemon/main.c) $(DAEMON_OBJ) $(CORE_OBJ)
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/weightctl: $(call obj,$(CTL_SRC)) $(CORE_OBJ) $(call obj,$(CLIENT_SRC))
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/weightd-replay: $(call obj,allocator/replay.c) $(CORE_OBJ)
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/weightd-mkckpt: $(call obj,loader/mkckpt.c) $(CORE_OBJ)
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/libweightd-client.so.0: $(CLIENT_OBJ) client/libweightd-client.map
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -shared -Wl,-soname,libweightd-client.so.0 \
	    -Wl,--version-script=client/libweightd-client.map -o $@ $(CLIENT_OBJ) $(PKG_LIBS) -lm -ldl -lpthread

# Loaded by path (torch.cuda.memory.CUDAPluggableAllocator): a plugin, with
# no soname, installed in LIBDIR/weightd/.
$(BUILD)/libweightd-torch.so: $(TORCH_OBJ) pytorch/libweightd-torch.map
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -shared -Wl,--no-undefined -Wl,--version-script=pytorch/libweightd-torch.map \
	    -o $@ $(TORCH_OBJ) $(PKG_LIBS) -lm -ldl -lpthread

$(BUILD)/libweightd-client.so: $(BUILD)/libweightd-client.so.0
	$(Q)ln -sf libweightd-client.so.0 $@

$(BUILD)/libweightd-client.a: $(CLIENT_OBJ)
	$(call msg,AR,$@)rm -f $@ && $(AR) rcs $@ $^

PC_SED = sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCDIR@|$(INCDIR)|; s|@VERSION@|$(VERSION)|'

$(BUILD)/weightd-client.pc: client/weightd-client.pc.in Makefile
	$(call msg,GEN,$@)$(PC_SED) $< > $@

$(BUILD)/etc/weightd.conf: $(BUILD)/weightd
	@mkdir -p $(dir $@)
	$(call msg,GEN,$@)$(BUILD)/weightd --print-config > $@.tmp && mv $@.tmp $@

# The paths in the unit are the install's: make install PREFIX=... rebuilds it.
UNIT_SED = sed -e 's|@SBINDIR@|$(SBINDIR)|g; s|@SYSCONFDIR@|$(SYSCONFDIR)|g'
$(BUILD)/etc/weightd.service: systemd/weightd.service.in Makefile $(BUILD)/etc/paths
	@mkdir -p $(dir $@)
	$(call msg,GEN,$@)$(UNIT_SED) $< > $@
$(BUILD)/etc/paths: FORCE
	@mkdir -p $(dir $@)
	@echo '$(SBINDIR) $(SYSCONFDIR)' | cmp -s - $@ || echo '$(SBINDIR) $(SYSCONFDIR)' > $@
.PHONY: FORCE

# Man pages, from each program's --help (help2man; scripts/bootstrap installs it).
MANS := $(BUILD)/man/weightd.8 $(patsubst $(BUILD)/%,$(BUILD)/man/%.1,$(USER_BINS))
MAN_NAME_weightd := the GPU weight-loading daemon
MAN_NAME_weightctl := control and query the weightd daemon
MAN_NAME_weightd-mkckpt := write a synthetic safetensors checkpoint shaped like a public model
MAN_NAME_weightd-replay := replay an allocation trace through weightd's allocator
man: $(MANS)
# The version from here (weightd --version also lists the backends built);
# packaging/man/synopsis.awk makes the usage lines a SYNOPSIS.
HELP2MAN = $(call msg,MAN,$@)help2man -N -s $(2) -n "$(MAN_NAME_$(1))" --version-string=$(VERSION) \
    -i packaging/man/$(1).h2m $(BUILD)/$(1) > $@.tmp \
    || { rm -f $@.tmp; echo "help2man failed (scripts/bootstrap installs help2man)"; exit 1; }; \
    awk -f packaging/man/synopsis.awk $@.tmp > $@ && rm $@.tmp
$(BUILD)/man/%.1: $(BUILD)/% packaging/man/%.h2m packaging/man/synopsis.awk
	@mkdir -p $(dir $@)
	$(call HELP2MAN,$*,1)
$(BUILD)/man/%.8: $(BUILD)/% packaging/man/%.h2m packaging/man/synopsis.awk
	@mkdir -p $(dir $@)
	$(call HELP2MAN,$*,8)

$(UNIT): $(call obj,$(UNIT_SRC)) $(DAEMON_OBJ) $(CORE_OBJ) $(call obj,$(CLIENT_SRC))
	@mkdir -p $(dir $@)
	$(call msg,LD,$@)$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(LDLIBS)

# `make test` runs every test: the Check units, then the end-to-end tests
# against the real programs of this build.
test: all $(UNIT)
	$(Q)$(MAKE) --no-print-directory unit e2e

unit: $(UNIT)
	$(Q)CK_DEFAULT_TIMEOUT=120 $(UNIT)

e2e: all
	$(Q)WEIGHTD_BUILD=$(abspath $(BUILD)) python3 -m unittest discover -s tests/e2e -t . $(if $(filter-out 0,$(V)),-v,)

demo: all
	$(Q)WEIGHTD_BUILD=$(abspath $(BUILD)) scripts/demo-run

# Benchmarks (bench/README.md). `bench` runs anywhere: replay speed on one
# core and the allocator table from weightd's side. `bench-gpu` runs on the
# GPU machine, where PyTorch replays the same traces side by side.
bench: $(BUILD)/weightd-replay
	$(Q)python3 bench/gen_traces.py --random 1000000 $(BUILD)/random-1m.trace
	$(Q)echo "replay speed, one core, 1,000,000 operations:"
	$(Q)taskset -c 0 $(BUILD)/weightd-replay $(BUILD)/random-1m.trace | grep 'replay time'
	$(Q)python3 bench/parity.py --no-torch --replay $(BUILD)/weightd-replay --out $(BUILD)/bench \
	    bench/traces/*.trace | sed -n '/^Minimum capacity/,$$p'

bench-gpu: $(BUILD)/weightd-replay
	$(Q)python3 bench/parity.py --replay $(BUILD)/weightd-replay --out $(BUILD)/bench bench/traces/*.trace

# On the GPU machine: the GPU tests, and the load benchmark (bench/load_bench.py).
# A C worker that captures a CUDA graph over attached weights (tests/gpu/test_sleep.py).
$(BUILD)/tests/graph_worker: tests/gpu/graph_worker.c common/cuda_driver.c common/errors.c $(BUILD)/libweightd-client.so
	@mkdir -p $(dir $@)
	$(call msg,LD,$@)$(CC) $(CFLAGS) -I. -o $@ $(filter %.c,$^) -L$(BUILD) -lweightd-client -Wl,-rpath,$(abspath $(BUILD)) -ldl -lpthread

# On the GPU machine: weightd's allocator inside PyTorch against PyTorch's
# own on a GPT-OSS-shaped load and rewrite (issue 13).
bench-torch-alloc: all
	$(Q)python3 bench/torch_alloc_bench.py --build $(BUILD) --out $(BUILD)/bench

gpu-test: all $(if $(CUDA_CFLAGS),$(BUILD)/tests/graph_worker)
	$(Q)WEIGHTD_BUILD=$(abspath $(BUILD)) python3 -m unittest discover -s tests/gpu -t . -v

# On the GPU machine: what the driver's VMM calls cost (vmmcost), and the
# read limit and weightd's read-and-copy scheme with nothing of weightd (pipebw).
$(BUILD)/vmmcost $(BUILD)/pipebw: $(BUILD)/%: bench/%.c bench/bench_cuda.h common/cuda_driver.c common/errors.c
	@mkdir -p $(dir $@)
	$(call msg,LD,$@)$(CC) $(CFLAGS) -o $@ $(filter %.c,$^) -ldl -lpthread

# On the GPU machine: sleep and wake of a 20 GB-plus model against the pinned
# copy limits both ways and a warm load, and the seed's scenario on a capped GPU.
bench-sleep: all
	$(Q)python3 bench/sleep_bench.py --build $(BUILD) --out $(BUILD)/bench

bench-load: all $(BUILD)/pipebw
	$(Q)python3 bench/load_bench.py --build $(BUILD) --out $(BUILD)/bench

# On the GPU machine: loads with checksums against loads without, and the
# rates of verify --quick, verify and attach --verify.
bench-integrity: all $(BUILD)/pipebw
	$(Q)python3 bench/load_bench.py --build $(BUILD) --out $(BUILD)/bench --warm-only --no-torch --runs 5 \
	    --variant checksums= --variant "nochecksums=--checksums off"
	$(Q)python3 bench/verify_bench.py --build $(BUILD) --out $(BUILD)/bench

# On the GPU machine: a fresh worker's attach of a 36-layer gpt-oss-shaped
# model against safetensors and a warm load, and 8 workers at once.
bench-attach: all
	$(Q)python3 bench/attach_bench.py --build $(BUILD) --out $(BUILD)/bench

# Anywhere: 500 connections repeating list, info, attach, detach on the host
# backend for 20 s, alone and beside a client loading and unloading another
# checkpoint (bench/conn_bench.py); writes bench/results/DATE-HOST-NCPUcpu-conns.{json,md}.
bench-conns: all
	$(Q)python3 bench/conn_bench.py --build $(BUILD) --work /tmp/wdconns --out bench/results

# The config file is installed once: one that is there already is the
# administrator's and is kept.
install: all man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCDIR) $(DESTDIR)$(PCDIR) \
	    $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSCONFDIR)/weightd \
	    $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m 755 $(USER_BINS) $(DESTDIR)$(BINDIR)/
	install -m 755 $(BUILD)/weightd $(DESTDIR)$(SBINDIR)/
	install -m 644 $(BUILD)/libweightd-client.so.0 $(DESTDIR)$(LIBDIR)/
	ln -sf libweightd-client.so.0 $(DESTDIR)$(LIBDIR)/libweightd-client.so
	install -m 644 $(BUILD)/libweightd-client.a $(DESTDIR)$(LIBDIR)/
	install -m 644 client/weightd-client.h pytorch/weightd-torch.h $(DESTDIR)$(INCDIR)/
	install -D -m 644 $(BUILD)/libweightd-torch.so -t $(DESTDIR)$(LIBDIR)/weightd/
	$(PC_SED) client/weightd-client.pc.in > $(DESTDIR)$(PCDIR)/weightd-client.pc
	install -m 644 $(BUILD)/etc/weightd.service systemd/weightd.socket $(DESTDIR)$(UNITDIR)/
	install -m 644 systemd/weightd.sysusers $(DESTDIR)$(SYSUSERSDIR)/weightd.conf
	install -m 644 systemd/weightd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/weightd.conf
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/weightd/weightd.conf ]; then \
	    echo "kept $(DESTDIR)$(SYSCONFDIR)/weightd/weightd.conf (the defaults are in weightd --print-config)"; \
	else echo "install -m 644 $(BUILD)/etc/weightd.conf $(DESTDIR)$(SYSCONFDIR)/weightd/"; \
	    install -m 644 $(BUILD)/etc/weightd.conf $(DESTDIR)$(SYSCONFDIR)/weightd/; fi
	install -m 644 $(filter %.1,$(MANS)) $(DESTDIR)$(MANDIR)/man1/
	install -m 644 $(filter %.8,$(MANS)) $(DESTDIR)$(MANDIR)/man8/
	$(if $(PYDIR),install -D -m 644 client/python/weightd/__init__.py client/python/weightd/torch_allocator.py \
	    -t $(DESTDIR)$(PYDIR)/weightd/)
	$(if $(PYDIR),printf '# Written by make install: where the client library is.\nLIBDIR = "%s"\n' '$(LIBDIR)' \
	    > $(DESTDIR)$(PYDIR)/weightd/_install.py)

# The config file goes only if it is still the template.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(notdir $(USER_BINS))) $(DESTDIR)$(SBINDIR)/weightd
	rm -f $(DESTDIR)$(LIBDIR)/libweightd-client.so.0 $(DESTDIR)$(LIBDIR)/libweightd-client.so \
	      $(DESTDIR)$(LIBDIR)/libweightd-client.a $(DESTDIR)$(INCDIR)/weightd-client.h \
	      $(DESTDIR)$(LIBDIR)/weightd/libweightd-torch.so $(DESTDIR)$(INCDIR)/weightd-torch.h \
	      $(DESTDIR)$(PCDIR)/weightd-client.pc $(DESTDIR)$(UNITDIR)/weightd.service \
	      $(DESTDIR)$(UNITDIR)/weightd.socket $(DESTDIR)$(SYSUSERSDIR)/weightd.conf \
	      $(DESTDIR)$(TMPFILESDIR)/weightd.conf $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(filter %.1,$(MANS)))) \
	      $(DESTDIR)$(MANDIR)/man8/weightd.8
	cmp -s $(BUILD)/etc/weightd.conf $(DESTDIR)$(SYSCONFDIR)/weightd/weightd.conf \
	    && rm -f $(DESTDIR)$(SYSCONFDIR)/weightd/weightd.conf && rmdir $(DESTDIR)$(SYSCONFDIR)/weightd || true
	$(if $(PYDIR),rm -rf $(DESTDIR)$(PYDIR)/weightd)

# A Debian package of a release build with Debian's build flags:
# build-deb/weightd_$(VERSION)_ARCH.deb (packaging/debian/mkdeb; lintian checks it).
deb:
	+$(Q)VERSION=$(VERSION) packaging/debian/mkdeb build-deb

# weightd installed from that package and run under a real systemd 252 in a
# container (tests/systemd/README.md); root, debootstrap and systemd-nspawn.
test-systemd: deb
	$(Q)tests/systemd/run build-deb/weightd_$(VERSION)_$(shell dpkg --print-architecture).deb

clean:
	rm -rf build build-san build-release build-deb $(BUILD)

help:
	@echo "targets: all (default) test unit e2e demo bench bench-conns man install uninstall deb test-systemd clean"
	@echo "         on the GPU machine: gpu-test bench-gpu bench-load bench-attach bench-integrity bench-sleep"
	@echo "         bench-torch-alloc"
	@echo "switches: PREFIX=$(PREFIX) DESTDIR= SYSCONFDIR=$(SYSCONFDIR) UNITDIR=$(UNITDIR) WITH_CUDA=auto|yes|no CUDA_HOME=$(CUDA_HOME)"
	@echo "          SANITIZE=address,undefined RELEASE=1 (no fault hooks; build-release) BUILD=dir V=1"

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

# ---- fuzzing (tests/fuzz/README.md) ------------------------------------------
# libFuzzer harnesses for the safetensors parser, checkpoint discovery,
# the protocol's reading side, the worker's attach and the daemon itself,
# built with clang from the sources themselves (not this build's gcc
# objects). Not part of `all` or `test`, which need no clang; the committed
# corpus is replayed by the end-to-end tests (tests/e2e/test_corpus.py).
#   make fuzz                      build/fuzz/fuzz_header, fuzz_discovery, fuzz_proto, fuzz_attach, fuzz_daemon
#   make fuzz-run FUZZ_SECONDS=N   each harness for N seconds (default 60)
FUZZ_CC      ?= clang
FUZZ_OUT     := build/fuzz
FUZZ_SECONDS ?= 60
FUZZ_FLAGS   ?=
FUZZ_CFLAGS  := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -g -O1 -std=gnu11 \
                -D_GNU_SOURCE -Wall -Wextra -I. $(shell pkg-config --cflags libcjson libxxhash 2>/dev/null)
FUZZ_LIBS    := $(shell pkg-config --libs libcjson libxxhash 2>/dev/null)
# client/attach.c hashes tensors (wdc_tensor_checksum): common/checksum.c, libxxhash; the
# checkpoint code has fault hooks (common/fault.c).
FUZZ_SRC     := loader/safetensors.c loader/checkpoint.c common/errors.c common/size.c common/checksum.c common/fault.c \
                proto/framing.c proto/message.c client/client.c client/attach.c
FUZZ_DEPS    := $(FUZZ_SRC) loader/safetensors.h loader/checkpoint.h common/errors.h common/size.h \
                common/checksum.h common/fault.h proto/proto.h client/internal.h client/weightd-client.h \
                tests/fuzz/fuzz_check.h Makefile
# Each harness with its -max_len: a whole-file image of a few tensors; an
# archive of up to 8 such files; a connection's worth of requests; an attach
# stream as a daemon sends it (the host backend's: the fuzz build has no CUDA).
# fuzz_daemon: a connection's request stream (after 2 bytes of flags) to a
# real wd_server; it runs every daemon source but main.c and lease.c (which
# the harness includes), the allocator, the loader, proto/ and common/.
FUZZ_HARNESSES := header:4096 discovery:8192 proto:8192 attach:16384 daemon:8192

.PHONY: fuzz fuzz-run
fuzz: $(foreach hm,$(FUZZ_HARNESSES),$(FUZZ_OUT)/fuzz_$(firstword $(subst :, ,$(hm))))

$(FUZZ_OUT)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_DEPS)
	@mkdir -p $(dir $@)
	$(call msg,FUZZCC,$@)$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $< $(FUZZ_SRC) $(FUZZ_LIBS)

# The daemon's sources as objects of their own (there are many), without
# CUDA: the host backend is what the harness runs.
FUZZ_DAEMON_SRC := $(filter-out daemon/lease.c,$(DAEMON_SRC)) \
                   $(filter-out $(CUDA_SRC),$(wildcard allocator/*.c)) $(LOADER_SRC) $(PROTO_SRC) \
                   $(filter-out $(CUDA_SRC),$(wildcard common/*.c))
FUZZ_DAEMON_SRC := $(filter-out allocator/replay.c,$(FUZZ_DAEMON_SRC))
FUZZ_DAEMON_OBJ := $(patsubst %.c,$(FUZZ_OUT)/obj/%.o,$(FUZZ_DAEMON_SRC))
FUZZ_DAEMON_LIBS := $(shell pkg-config --libs libuv libcjson libsystemd libxxhash 2>/dev/null) -lpthread -lm -ldl

$(FUZZ_OUT)/obj/%.o: %.c Makefile
	@mkdir -p $(dir $@)
	$(call msg,FUZZCC,$@)$(FUZZ_CC) $(FUZZ_CFLAGS) -DWD_VERSION='"$(VERSION)"' \
	    $(shell pkg-config --cflags libuv libsystemd 2>/dev/null) -MMD -MP -c $< -o $@

$(FUZZ_OUT)/fuzz_daemon: tests/fuzz/fuzz_daemon.c $(FUZZ_DAEMON_OBJ) tests/fuzz/fuzz_check.h Makefile
	@mkdir -p $(dir $@)
	$(call msg,FUZZCC,$@)$(FUZZ_CC) $(FUZZ_CFLAGS) -DWD_VERSION='"$(VERSION)"' \
	    $(shell pkg-config --cflags libuv libsystemd 2>/dev/null) -MMD -MP -o $@ $< $(FUZZ_DAEMON_OBJ) \
	    $(FUZZ_DAEMON_LIBS)

-include $(shell find $(FUZZ_OUT) -name '*.d' 2>/dev/null)

# Each harness works on its own corpus in build/fuzz/corpus/NAME (new inputs
# go there), seeded from tests/fuzz/corpus/NAME and tests/fuzz/regressions/NAME,
# with tests/fuzz/NAME.dict. The full log is build/fuzz/fuzz_NAME.log; crashes
# go to build/fuzz/artifacts/. Extra libFuzzer flags: FUZZ_FLAGS="-jobs=2 ...".
# A live protocol fuzz campaign against a running daemon of this build,
# with a well-behaved client checking every answer (tests/fuzz/live.py).
LIVE_SECONDS ?= 45
fuzz-live: all
	$(Q)python3 tests/fuzz/live.py --build $(BUILD) --seconds $(LIVE_SECONDS)

fuzz-run: fuzz
	$(Q)for hm in $(FUZZ_HARNESSES); do \
	    h=$${hm%%:*}; maxlen=$${hm#*:}; \
	    mkdir -p $(FUZZ_OUT)/corpus/$$h $(FUZZ_OUT)/artifacts; \
	    seeds=tests/fuzz/corpus/$$h; \
	    if [ -d tests/fuzz/regressions/$$h ]; then seeds="$$seeds tests/fuzz/regressions/$$h"; fi; \
	    echo "== fuzz_$$h: $(FUZZ_SECONDS) s, -max_len=$$maxlen, log in $(FUZZ_OUT)/fuzz_$$h.log"; \
	    rc=0; $(FUZZ_OUT)/fuzz_$$h -max_total_time=$(FUZZ_SECONDS) -max_len=$$maxlen -timeout=10 \
	        -print_final_stats=1 -dict=tests/fuzz/$$h.dict -artifact_prefix=$(FUZZ_OUT)/artifacts/$$h- \
	        $(FUZZ_FLAGS) $(FUZZ_OUT)/corpus/$$h $$seeds > $(FUZZ_OUT)/fuzz_$$h.log 2>&1 || rc=$$?; \
	    sed -e '/^#[0-9]*[[:space:]]*\(NEW\|REDUCE\|pulse\|RELOAD\)/d' \
	        -e '/Recommended dictionary/,/End of recommended dictionary/d' $(FUZZ_OUT)/fuzz_$$h.log; \
	    if [ $$rc != 0 ]; then echo "fuzz_$$h FAILED (exit $$rc): see $(FUZZ_OUT)/artifacts/"; exit $$rc; fi; \
	done
