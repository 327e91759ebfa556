// luo-smoke: keeps a memfd across kexec through the Live Update Orchestrator and checks it came back
// whole. The smallest end-to-end check of what kup's luo backend builds on (see README.md).
//
//   luo-smoke preserve NAME MIB   fill a memfd of MIB MiB with a pattern, preserve it in LUO session
//                                 NAME (token 1), print "ready", then hold the session fd until killed
//                                 (a session lives as long as its fd: run it in the background and
//                                 kexec with `kexec -e` while it runs)
//   luo-smoke retrieve NAME MIB   on the new kernel: retrieve session NAME, token 1, check every word
//                                 of the pattern, FINISH the session; exit 0 when all is there
//
// Build: gcc -O2 -static -o luo-smoke luo-smoke.c (LUO's ioctls from luo-uapi.h, beside it).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "luo-uapi.h"

static void die(const char *what) {
	fprintf(stderr, "luo-smoke: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t word(uint64_t i) { return (i + 1) * 0x9E3779B97F4A7C15ull ^ 0x6b7570u; }

int main(int argc, char **argv) {
	if (argc != 4) {
		fprintf(stderr, "usage: luo-smoke preserve|retrieve NAME MIB\n");
		return 2;
	}
	size_t len = (size_t)strtoul(argv[3], NULL, 10) << 20;
	uint64_t n = len / 8;
	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0) die("open /dev/liveupdate (booted with kho=on liveupdate=on?)");
	struct session_arg s = { .size = sizeof s, .fd = -1 };
	snprintf((char *)s.name, sizeof s.name, "%s", argv[2]);

	if (!strcmp(argv[1], "preserve")) {
		if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &s) < 0) die("CREATE_SESSION");
		int mfd = memfd_create("luo-smoke", 0);
		if (mfd < 0) die("memfd_create");
		if (ftruncate(mfd, (off_t)len) < 0) die("ftruncate");
		uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		if (p == MAP_FAILED) die("mmap");
		for (uint64_t i = 0; i < n; i++) p[i] = word(i);   // dense: every page written
		munmap(p, len);
		struct fd_arg f = { .size = sizeof f, .fd = mfd, .token = 1 };
		if (ioctl(s.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &f) < 0) die("PRESERVE_FD");
		close(dev);   // the session outlives the /dev/liveupdate fd; it lives as long as s.fd
		printf("luo-smoke: preserved %zu MiB in session %s (session fd %d); ready\n", len >> 20, argv[2], s.fd);
		fflush(stdout);
		for (;;) pause();
	}
	if (!strcmp(argv[1], "retrieve")) {
		if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &s) < 0) die("RETRIEVE_SESSION");
		struct fd_arg f = { .size = sizeof f, .fd = -1, .token = 1 };
		if (ioctl(s.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &f) < 0) die("RETRIEVE_FD");
		off_t size = lseek(f.fd, 0, SEEK_END);
		if ((size_t)size != len) {
			fprintf(stderr, "luo-smoke: retrieved memfd is %lld bytes, expected %zu\n", (long long)size, len);
			return 1;
		}
		uint64_t *p = mmap(NULL, len, PROT_READ, MAP_SHARED, f.fd, 0);
		if (p == MAP_FAILED) die("mmap");
		uint64_t bad = 0;
		for (uint64_t i = 0; i < n; i++) bad += p[i] != word(i);
		struct finish_arg fin = { .size = sizeof fin };
		if (ioctl(s.fd, LIVEUPDATE_SESSION_FINISH, &fin) < 0) die("FINISH");
		printf("luo-smoke: retrieved %zu MiB from session %s: %llu of %llu words differ\n", len >> 20, argv[2],
		       (unsigned long long)bad, (unsigned long long)n);
		return bad != 0;
	}
	fprintf(stderr, "luo-smoke: unknown command %s (preserve or retrieve)\n", argv[1]);
	return 2;
}
