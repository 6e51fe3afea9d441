/*
 * ferry-responder: the Linux test guest's network workload. Answers every
 * UDP datagram on PORT with the same bytes, back to its sender, so a peer
 * can count requests that went unanswered while the guest migrates.
 *
 * Usage: ferry-responder [PORT]   (default 7777)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 7777;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(port) };
	char buf[2048];

	if (fd < 0 || bind(fd, (struct sockaddr *)&me, sizeof me) != 0) {
		perror("ferry-responder");
		return 1;
	}
	printf("ferry-responder on udp port %d\n", port);
	fflush(stdout);
	for (;;) {
		struct sockaddr_in from;
		socklen_t len = sizeof from;
		ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
		if (n >= 0)
			sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
	}
}
