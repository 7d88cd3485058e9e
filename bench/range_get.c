// The benchmark's ceiling client where curl is missing (a GPU host with no network to install
// it): plain HTTP/1.1 ranged GETs, one after another on one keep-alive connection as `curl -K`
// does, each body read into one reused buffer and written to /dev/null or a file. Prints
// "<status> <bytes>" per request, as the curl configs' write-out does.
//
//   range_get HOST PORT LIST      LIST: one request per line, "PATH?QUERY FIRST LAST OUTPUT"
//
// Built by bench_blob_load.py with the system C compiler (cc -O2).
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

enum { kBufferBytes = 1 << 20, kHeadBytes = 16384 };

static void die(const char* what) {
  fprintf(stderr, "range_get: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int connect_to(const char* host, const char* port) {
  struct addrinfo hints = {0}, *found = NULL;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host, port, &hints, &found) != 0) die("getaddrinfo");
  int fd = socket(found->ai_family, found->ai_socktype, found->ai_protocol);
  if (fd < 0 || connect(fd, found->ai_addr, found->ai_addrlen) != 0) die("connect");
  freeaddrinfo(found);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static void send_all(int fd, const char* data, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("send");
    }
    data += w;
    n -= (size_t)w;
  }
}

static void write_all(int fd, const char* data, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("write");
    }
    data += w;
    n -= (size_t)w;
  }
}

// Header value of `name` (case-insensitive) in the response head, or NULL.
static const char* header(const char* head, const char* name) {
  size_t len = strlen(name);
  for (const char* line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
    if (strncasecmp(line + 2, name, len) == 0 && line[2 + len] == ':') {
      const char* v = line + 3 + len;
      while (*v == ' ') v++;
      return v;
    }
  }
  return NULL;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: range_get HOST PORT LIST\n");
    return 2;
  }
  FILE* list = fopen(argv[3], "r");
  if (!list) die(argv[3]);
  char* buffer = malloc(kBufferBytes);
  char head[kHeadBytes + 1];
  char line[8192], path[8000], output[4096], request[9000];
  unsigned long long first, last;
  int fd = -1;
  while (fgets(line, sizeof line, list)) {
    if (sscanf(line, "%7999s %llu %llu %4095s", path, &first, &last, output) != 4) continue;
    if (fd < 0) fd = connect_to(argv[1], argv[2]);
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nx-ms-range: bytes=%llu-%llu\r\n"
                     "x-ms-version: 2021-08-06\r\n\r\n",
                     path, argv[1], argv[2], first, last);
    send_all(fd, request, (size_t)n);
    // The head, and whatever part of the body came with it.
    size_t have = 0;
    char* end = NULL;
    while (!end) {
      if (have == kHeadBytes) {
        fprintf(stderr, "range_get: response head over %d bytes\n", kHeadBytes);
        return 1;
      }
      ssize_t r = recv(fd, head + have, kHeadBytes - have, 0);
      if (r <= 0) die("recv (head)");
      have += (size_t)r;
      head[have] = '\0';
      end = strstr(head, "\r\n\r\n");
    }
    int status = atoi(head + 9);  // "HTTP/1.1 206 ..."
    const char* length_text = header(head, "Content-Length");
    unsigned long long length = length_text ? strtoull(length_text, NULL, 10) : 0;
    const char* connection = header(head, "Connection");
    int closing = connection && strncasecmp(connection, "close", 5) == 0;
    int out = -1;  // /dev/null: the body is read and dropped
    if (strcmp(output, "/dev/null") != 0) {
      out = open(output, O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (out < 0) die(output);
    }
    size_t early = have - (size_t)(end + 4 - head);
    if (out >= 0) write_all(out, end + 4, early);
    unsigned long long got = early;
    while (got < length) {
      size_t want = length - got < kBufferBytes ? (size_t)(length - got) : kBufferBytes;
      ssize_t r = recv(fd, buffer, want, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) die("recv (body)");
      if (out >= 0) write_all(out, buffer, (size_t)r);
      got += (unsigned long long)r;
    }
    if (out >= 0) close(out);
    printf("%d %llu\n", status, got);
    if (closing) {
      close(fd);
      fd = -1;
    }
  }
  if (fd >= 0) close(fd);
  free(buffer);
  return 0;
}
