// ppp-smoke: the test of patches/0001-memfd-luo-ppp.patch (kselftest style, TAP on stdout): a
// process's anonymous memory kept in RAM, in place, across kexec through LUO, by preserving its
// pidfd. kup's persistent physical pages (PPP) build on this.
//
//   ppp-smoke preserve NAME MIB   a child fills MIB MiB of anonymous memory at fixed addresses (half
//                                 in 2 MiB THPs, half in 4 KiB pages with never-touched holes, plus
//                                 a region shared with a forked grandchild, a zero-page region and a
//                                 shared mapping) and stops; its pidfd is preserved in LUO session
//                                 NAME (token 1); checks that this copied (almost) nothing, that a
//                                 second preservation of the same process is refused, that the
//                                 memory stays readable through /proc/PID/mem after the child is
//                                 killed; prints "# ready", then holds the session until the kexec
//   ppp-smoke retrieve NAME MIB   on the new kernel: the session's token 1 is a memfd whose page at
//                                 offset A is the child's page at address A: every word written is
//                                 there, the holes, the zero page and the shared mapping are holes;
//                                 FINISH
//
// Build: gcc -O2 -static -o ppp-smoke ppp-smoke.c (LUO's ioctls from luo-uapi.h, beside it). Exit status 0
// when every test passed. Run by tests/lab/tests/ppp.rs through kernel-patches/boot-check.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "luo-uapi.h"

#define PAGE 4096ul
#define MIB (1ul << 20)
// The child's regions, at fixed addresses so that the new kernel knows where to look.
#define THP_AT 0x200000000ul    // half of MIB, 2 MiB aligned, MADV_HUGEPAGE, every word written
#define SMALL_AT 0x600000000ul  // half of MIB, MADV_NOHUGEPAGE, every 8th page never touched
#define FORKED_AT 0xa00000000ul // 4 MiB written before a fork: shared with the grandchild (copied)
#define ZERO_AT 0xb00000000ul   // 1 MiB only read: the zero page, not preserved
#define SHARED_AT 0xc00000000ul // 1 MiB MAP_SHARED, written: not anonymous-private, not preserved
#define FORKED_LEN (4 * MIB)
#define ZERO_LEN MIB
#define SHARED_LEN MIB

static int tests, failed;
static pid_t child_pid; // killed when the test bails out, so that no stopped child is left behind

static void result(int ok, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	printf("%sok %d - ", ok ? "" : "not ", ++tests);
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
	failed += !ok;
}

static void bail(const char *what) {
	printf("Bail out! %s: %s\n", what, strerror(errno));
	if (child_pid > 0) kill(child_pid, SIGKILL);
	exit(1);
}

static uint64_t word(uint64_t addr) { return addr * 0x9E3779B97F4A7C15ull ^ 0x6b7570u; }
static int small_hole(uint64_t page) { return page % 8 == 7; }

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static long meminfo_kib(const char *field) {
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	long v = -1;
	size_t n = strlen(field);
	if (!f) bail("/proc/meminfo");
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, field, n) && line[n] == ':') v = strtol(line + n + 1, NULL, 10);
	fclose(f);
	return v;
}

static void *map_at(uint64_t at, size_t len, int flags) {
	void *p = mmap((void *)at, len, PROT_READ | PROT_WRITE, flags | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED) bail("mmap");
	return p;
}

static void fill(uint64_t at, size_t len, int holes) {
	for (uint64_t a = at; a < at + len; a += 8) {
		if (holes && small_hole((a - at) / PAGE)) continue;
		*(volatile uint64_t *)a = word(a);
	}
}

// The process whose memory is kept: it fills its regions, reports, and stops (as a checkpointed
// service is frozen) until it is killed.
static void child(size_t len, int report) {
	map_at(FORKED_AT, FORKED_LEN, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(FORKED_AT, FORKED_LEN, 0);
	if (fork() == 0) { // the grandchild shares FORKED's pages (copy-on-write) and waits
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		for (;;) pause();
	}
	void *t = map_at(THP_AT, len / 2, MAP_PRIVATE | MAP_ANONYMOUS);
	madvise(t, len / 2, MADV_HUGEPAGE);
	fill(THP_AT, len / 2, 0);
	void *s = map_at(SMALL_AT, len / 2, MAP_PRIVATE | MAP_ANONYMOUS);
	madvise(s, len / 2, MADV_NOHUGEPAGE);
	fill(SMALL_AT, len / 2, 1);
	volatile uint64_t *z = map_at(ZERO_AT, ZERO_LEN, MAP_PRIVATE | MAP_ANONYMOUS);
	uint64_t sum = 0;
	for (size_t i = 0; i < ZERO_LEN / 8; i += PAGE / 8) sum += z[i];
	map_at(SHARED_AT, SHARED_LEN, MAP_SHARED | MAP_ANONYMOUS);
	fill(SHARED_AT, SHARED_LEN, 0);
	char c = sum == 0 ? 'r' : 'x';
	if (write(report, &c, 1) != 1) _exit(1);
	for (;;) raise(SIGSTOP);
}

// Words of [at, at + len) read through `fd` at offset address - base that differ from the pattern
// (holes in SMALL expected to read as zero when `holes`).
static uint64_t differing(int fd, uint64_t base, uint64_t at, size_t len, int holes) {
	static uint64_t buf[MIB / 8];
	uint64_t bad = 0;
	for (uint64_t off = 0; off < len; off += sizeof buf) {
		size_t n = len - off < sizeof buf ? len - off : sizeof buf;
		if (pread(fd, buf, n, (off_t)(at + off - base)) != (ssize_t)n) return len / 8;
		for (size_t i = 0; i < n / 8; i++) {
			uint64_t a = at + off + i * 8;
			uint64_t want = holes && small_hole((a - at) / PAGE) ? 0 : word(a);
			bad += buf[i] != want;
		}
	}
	return bad;
}

static int preserve(const char *name, size_t len) {
	int report[2];
	if (pipe(report)) bail("pipe");
	long avail_before_child = meminfo_kib("MemAvailable");
	pid_t pid = fork();
	if (pid == 0) {
		close(report[0]);
		child(len, report[1]);
	}
	close(report[1]);
	child_pid = pid;
	char c = 0;
	if (read(report[0], &c, 1) != 1 || c != 'r') bail("the child did not fill its memory");
	int st;
	if (waitpid(pid, &st, WUNTRACED) != pid || !WIFSTOPPED(st)) bail("waiting for the child to stop");
	printf("# child %d filled %zu MiB (MemAvailable %ld -> %ld MiB)\n", pid, len >> 20,
	       avail_before_child >> 10, meminfo_kib("MemAvailable") >> 10);

	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0) bail("open /dev/liveupdate (booted with kho=on liveupdate=on?)");
	int on = open("/sys/module/memfd_luo/parameters/ppp", O_RDONLY);
	char yes = 0;
	result(on >= 0 && read(on, &yes, 1) == 1 && yes == 'Y', "the kernel offers in-place preservation (memfd_luo.ppp = Y)");
	struct session_arg s = { .size = sizeof s, .fd = -1 };
	snprintf((char *)s.name, sizeof s.name, "%s", name);
	if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &s) < 0) bail("CREATE_SESSION");
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0) bail("pidfd_open");
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/mem", pid);
	int mem = open(path, O_RDONLY);
	if (mem < 0) bail(path);

	long avail = meminfo_kib("MemAvailable");
	double t = now();
	struct fd_arg f = { .size = sizeof f, .fd = pidfd, .token = 1 };
	int r = ioctl(s.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &f);
	double took = now() - t;
	result(r == 0, "PRESERVE_FD of the child's pidfd (%s) in %.2f s", r ? strerror(errno) : "ok", took);
	if (r) return 1;
	long used_mib = (avail - meminfo_kib("MemAvailable")) >> 10;
	// A copy would take the whole MIB; the pages kept in place cost only their records (16 bytes
	// per 4 KiB page) and the few pages copied (shared with the grandchild, or in KHO's scratch).
	result(used_mib < (long)(len >> 20) / 4, "preserving %zu MiB in place took %ld MiB of RAM (a copy would take all)",
	       len >> 20, used_mib);
	struct fd_arg again = { .size = sizeof again, .fd = pidfd, .token = 2 };
	r = ioctl(s.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &again);
	result(r < 0, "a second preservation of the same process is refused (%s)", r ? strerror(errno) : "accepted");

	// The child exits (as CRIU kills a checkpointed tree); its memory stays, readable.
	kill(pid, SIGKILL);
	waitpid(pid, &st, 0);
	child_pid = 0;
	uint64_t bad = differing(mem, 0, THP_AT, len / 2, 0) + differing(mem, 0, SMALL_AT, len / 2, 1) +
		       differing(mem, 0, FORKED_AT, FORKED_LEN, 0);
	result(bad == 0, "after the child was killed, its memory reads back through /proc/PID/mem (%llu words differ)",
	       (unsigned long long)bad);
	close(mem);
	close(dev);
	printf("# ready: session %s holds the memory of child %d; kexec now (kexec -s)\n", name, pid);
	printf("# %s\n", failed ? "FAILED" : "PASSED so far");
	fflush(stdout);
	if (failed) return 1;
	for (;;) pause();
}

static int retrieve(const char *name, size_t len) {
	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0) bail("open /dev/liveupdate (booted with kho=on liveupdate=on?)");
	struct session_arg s = { .size = sizeof s, .fd = -1 };
	snprintf((char *)s.name, sizeof s.name, "%s", name);
	if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &s) < 0) bail("RETRIEVE_SESSION");
	double t = now();
	struct fd_arg f = { .size = sizeof f, .fd = -1, .token = 1 };
	int r = ioctl(s.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &f);
	result(r == 0, "RETRIEVE_FD of token 1 (%s) in %.2f s", r ? strerror(errno) : "ok", now() - t);
	if (r) return 1;
	struct stat st;
	fstat(f.fd, &st);
	uint64_t expect = len / 2 + len / 2 - (len / 2 / PAGE / 8) * PAGE + FORKED_LEN;
	uint64_t held = (uint64_t)st.st_blocks * 512;
	// Besides the regions: the child's stack, heap, data and the like (a few MiB at most).
	result(held >= expect && held < expect + 16 * MIB,
	       "the memfd holds %llu MiB: the %llu MiB written and the child's few other pages, no more",
	       (unsigned long long)held >> 20, (unsigned long long)expect >> 20);
	uint64_t bad = differing(f.fd, 0, THP_AT, len / 2, 0);
	result(bad == 0, "the THP region, every word at its address (%llu differ)", (unsigned long long)bad);
	bad = differing(f.fd, 0, SMALL_AT, len / 2, 1);
	result(bad == 0, "the 4 KiB region, every word at its address, the holes zero (%llu differ)", (unsigned long long)bad);
	off_t data = lseek(f.fd, (off_t)(SMALL_AT + 7 * PAGE), SEEK_DATA);
	result(data == (off_t)(SMALL_AT + 8 * PAGE), "a page the child never touched is a hole");
	bad = differing(f.fd, 0, FORKED_AT, FORKED_LEN, 0);
	result(bad == 0, "the region shared with the grandchild (copied) (%llu differ)", (unsigned long long)bad);
	data = lseek(f.fd, (off_t)ZERO_AT, SEEK_DATA);
	result(data < 0 || data >= (off_t)(ZERO_AT + ZERO_LEN), "the zero-page region is a hole");
	data = lseek(f.fd, (off_t)SHARED_AT, SEEK_DATA);
	result(data < 0 || data >= (off_t)(SHARED_AT + SHARED_LEN), "the shared mapping is a hole");
	struct finish_arg fin = { .size = sizeof fin };
	r = ioctl(s.fd, LIVEUPDATE_SESSION_FINISH, &fin);
	result(r == 0, "FINISH (%s)", r ? strerror(errno) : "ok");
	printf("# %s\n", failed ? "FAILED" : "PASSED");
	return failed != 0;
}

int main(int argc, char **argv) {
	if (argc != 4) {
		fprintf(stderr, "usage: ppp-smoke preserve|retrieve NAME MIB\n");
		return 2;
	}
	size_t len = ((size_t)strtoul(argv[3], NULL, 10) << 20) & ~(4 * MIB - 1);
	if (len < 8 * MIB || len > 16384 * MIB) {
		fprintf(stderr, "ppp-smoke: MIB must be between 8 and 16384\n");
		return 2;
	}
	printf("TAP version 13\n");
	if (!strcmp(argv[1], "preserve")) return preserve(argv[2], len);
	if (!strcmp(argv[1], "retrieve")) return retrieve(argv[2], len);
	fprintf(stderr, "ppp-smoke: unknown command %s (preserve or retrieve)\n", argv[1]);
	return 2;
}
