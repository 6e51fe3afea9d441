/*
 * ferry-dirtier: the Linux test guest's memory workload.
 *
 * Rewrites every page of a MiB-sized buffer on each pass with a pattern
 * derived from (page, pass), then checks the whole buffer against the
 * previous pass before the next one. A page that a migration lost or
 * corrupted shows as a MISMATCH line. Every pass prints one line on the
 * console:  "ferry-dirtier pass N ok"  (few syscalls: they are slow on
 * the emulated guest kernel). It runs at the lowest priority (nice 19):
 * it stands for a batch job, and the guest's services (the disk writer,
 * the UDP responder) take the one vCPU whenever they have work.
 *
 * Usage: ferry-dirtier [MiB] [passes, 0 = forever]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>

#define PAGE 4096u

static uint64_t pattern(uint64_t page, uint64_t pass)
{
	uint64_t x = (page + 1) * 0x9e3779b97f4a7c15ull ^ (pass + 1) * 0xc2b2ae3d27d4eb4full;
	return x ^ (x >> 29);
}

int main(int argc, char **argv)
{
	uint64_t mib = argc > 1 ? strtoull(argv[1], 0, 10) : 64;
	uint64_t passes = argc > 2 ? strtoull(argv[2], 0, 10) : 0;
	uint64_t pages = mib * (1024 * 1024 / PAGE);
	uint64_t *buf = malloc(pages * PAGE);
	char line[96];

	/* Best effort: without it the workload still runs, only greedier. */
	(void)setpriority(PRIO_PROCESS, 0, 19);

	if (!buf) {
		fputs("ferry-dirtier: out of memory\n", stderr);
		return 1;
	}
	for (uint64_t pass = 1; passes == 0 || pass <= passes; pass++) {
		uint64_t bad = 0;
		for (uint64_t p = 0; p < pages; p++) {
			uint64_t *w = buf + p * (PAGE / 8);
			/* The first word says which pass wrote the page, the rest
			 * is the pattern, so a stale page is told from a corrupt one. */
			if (pass > 1 && (w[0] != pass - 1 || w[1] != pattern(p, pass - 1) ||
					 w[PAGE / 8 - 1] != pattern(p, pass - 1)))
				bad++;
			w[0] = pass;
			for (unsigned i = 1; i < PAGE / 8; i++)
				w[i] = pattern(p, pass);
		}
		int n = bad ? snprintf(line, sizeof line, "ferry-dirtier pass %llu MISMATCH %llu pages\n",
				       (unsigned long long)pass, (unsigned long long)bad)
			    : snprintf(line, sizeof line, "ferry-dirtier pass %llu ok\n",
				       (unsigned long long)pass);
		if (write(1, line, (size_t)n) < 0)
			return 2;
	}
	return 0;
}
