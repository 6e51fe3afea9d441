/*
 * ferry-diskwriter: the Linux test guest's disk workload.
 *
 * Writes ferry's verifiable pattern (ferry_actors::storage::pattern) to a
 * block device: write SEQ (1, 2, ...) fills 4 KiB block (SEQ * stride) %
 * blocks with words derived from the block number and SEQ. Each write is
 * O_DIRECT and followed by fdatasync, so once it returns the write is on
 * the virtual disk's stable storage; only then is it counted as
 * acknowledged. About twice a second it prints the newest acknowledged
 * write:  "ferry-diskwriter acked N"  (a checker proves every block holds
 * its newest write up to N). It starts after the newest write already on
 * the device (found by a binary search, see newest_write), so a guest
 * booted again continues the sequence.
 *
 * Usage: ferry-diskwriter DEVICE [gap in ms between writes]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
/* <linux/fs.h>'s, here so the program builds against musl's headers. */
#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define WORDS (BLOCK / 8)

static const uint64_t K_SEQ = 0x9E3779B97F4A7C15ull;
static const uint64_t K_BLOCK = 0xC2B2AE3D27D4EB4Full;

static uint64_t blocks, stride;

static uint64_t word(uint64_t block, uint64_t seq, uint64_t i)
{
	if (i == 0)
		return block;
	if (i == 1)
		return seq;
	return (seq * K_SEQ) ^ (block * K_BLOCK) ^ i;
}

static uint64_t block_of(uint64_t seq)
{
	return (uint64_t)(((unsigned __int128)seq * stride) % blocks);
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

/* The write a block holds, or 0. */
static uint64_t decode(uint64_t block, const uint64_t *w)
{
	uint64_t seq = w[1];
	if (seq == 0 || w[0] != block || block_of(seq) != block)
		return 0;
	for (uint64_t i = 0; i < WORDS; i++)
		if (w[i] != word(block, seq, i))
			return 0;
	return seq;
}

/* The write the block at position S of a lap holds (S = 1 .. blocks: the
 * block write S, S + blocks, S + 2 * blocks, ... go to), or 0. */
static int held_at(int fd, uint64_t *buf, uint64_t s, uint64_t *seq)
{
	uint64_t block = block_of(s);
	if (pread(fd, buf, BLOCK, (off_t)(block * BLOCK)) != (ssize_t)BLOCK)
		return -1;
	*seq = decode(block, buf);
	return 0;
}

/*
 * The newest write on the device, in about log2(blocks) reads rather than
 * a pass over the whole disk (a pass over 256 MiB takes minutes through an
 * emulated guest kernel). Writes go one at a time to positions 1, 2, ...,
 * blocks, 1, 2, ... so, if the newest is at position R of lap L, the
 * positions up to R hold lap L's writes and those after it lap L - 1's (or
 * nothing): every one of the first is newer than the write at position 1
 * and every one of the second older. The one write that may have been in
 * flight when the guest stopped (position R + 1) holds either its new
 * write (then it is the newest) or something that does not decode (0,
 * older than everything): the split holds either way. Binary search finds
 * R, the last position holding a write at least as new as position 1's.
 */
static int newest_write(int fd, uint64_t *buf, uint64_t *newest)
{
	uint64_t first, lo = 1, hi = blocks, seq;
	if (held_at(fd, buf, 1, &first) != 0)
		return -1;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo + 1) / 2;
		if (held_at(fd, buf, mid, &seq) != 0)
			return -1;
		if (seq >= first)
			lo = mid;
		else
			hi = mid - 1;
	}
	return held_at(fd, buf, lo, newest);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	const char *dev = argc > 1 ? argv[1] : "/dev/vda";
	long gap_ms = argc > 2 ? strtol(argv[2], 0, 10) : 0;
	uint64_t size = 0, newest = 0;
	uint64_t *buf;
	int fd = open(dev, O_RDWR | O_DIRECT);

	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) != 0) {
		perror("ferry-diskwriter: open");
		return 1;
	}
	blocks = size / BLOCK;
	if (blocks == 0) {
		fputs("ferry-diskwriter: the device holds no whole block\n", stderr);
		return 1;
	}
	stride = (blocks / 8 * 5 > 1 ? blocks / 8 * 5 : 1) | 1;
	while (gcd(stride, blocks) != 1)
		stride += 2;
	if (posix_memalign((void **)&buf, BLOCK, BLOCK) != 0)
		return 1;
	if (newest_write(fd, buf, &newest) != 0) {
		perror("ferry-diskwriter: finding the newest write");
		return 1;
	}
	printf("ferry-diskwriter on %s: %llu blocks, stride %llu, from write %llu\n", dev,
	       (unsigned long long)blocks, (unsigned long long)stride,
	       (unsigned long long)newest + 1);
	fflush(stdout);
	double printed = now();
	for (uint64_t seq = newest + 1;; seq++) {
		uint64_t block = block_of(seq);
		for (uint64_t i = 0; i < WORDS; i++)
			buf[i] = word(block, seq, i);
		if (pwrite(fd, buf, BLOCK, block * BLOCK) != BLOCK || fdatasync(fd) != 0) {
			printf("ferry-diskwriter write %llu FAILED: %s\n", (unsigned long long)seq,
			       strerror(errno));
			fflush(stdout);
			sleep(1);
			seq--;
			continue;
		}
		if (now() - printed >= 0.5) {
			printf("ferry-diskwriter acked %llu\n", (unsigned long long)seq);
			fflush(stdout);
			printed = now();
		}
		if (gap_ms > 0)
			usleep(gap_ms * 1000);
	}
}
