// probe: a WASI test guest for kwasm's engine tests (compiled by the tests with clang-14).
//   probe copy PATH        copy stdin to PATH, print "copied N"
//   probe open PATH        try to create PATH, print "ok" (exit 0) or "denied: ERR" (exit 1)
//   probe cat PATH         print the file at PATH
//   probe spin             loop forever
//   probe alloc MIB        allocate and touch MIB mebibytes, print "ok"
//   probe poll2            poll two relative clocks (50 ms, 5 s): print which fired and the elapsed ms
//   probe pollabs MS       poll an absolute realtime deadline MS from now: print elapsed ms
//   probe pollstdin MS     poll stdin readability with an MS timeout: print "stdin" or "timeout"
//   probe yield N          call sched_yield N times, print "yielded"
//   probe trap             execute unreachable
//   probe env NAME         print the value of environment variable NAME (exit 1 if unset)
//   probe flood BYTES CHUNK  write BYTES pattern bytes (byte i is i % 251) to stdout with write(2) calls
//                          of CHUNK bytes, then printf "flooded BYTES"; a failed write is reported on
//                          stderr ("flood: ERROR after N bytes") and exits 3 for EPIPE, 1 otherwise
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <wasi/api.h>

static long long now_ms(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int poll_subs(__wasi_subscription_t *subs, int n, __wasi_event_t *events) {
  __wasi_size_t got = 0;
  __wasi_errno_t err = __wasi_poll_oneoff(subs, events, n, &got);
  if (err != 0) {
    printf("poll error %d\n", err);
    exit(2);
  }
  return (int)got;
}

static __wasi_subscription_t clock_sub(__wasi_userdata_t tag, __wasi_clockid_t id, __wasi_timestamp_t t, int abs) {
  __wasi_subscription_t s;
  memset(&s, 0, sizeof s);
  s.userdata = tag;
  s.u.tag = __WASI_EVENTTYPE_CLOCK;
  s.u.u.clock.id = id;
  s.u.u.clock.timeout = t;
  s.u.u.clock.flags = abs ? __WASI_SUBCLOCKFLAGS_SUBSCRIPTION_CLOCK_ABSTIME : 0;
  return s;
}

int main(int argc, char **argv) {
  if (argc < 2) return 64;
  const char *cmd = argv[1];
  if (!strcmp(cmd, "copy") && argc == 3) {
    FILE *out = fopen(argv[2], "w");
    if (!out) { printf("denied: %s\n", strerror(errno)); return 1; }
    char buf[4096];
    size_t total = 0, n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) { fwrite(buf, 1, n, out); total += n; }
    fclose(out);
    printf("copied %zu\n", total);
    return 0;
  }
  if (!strcmp(cmd, "open") && argc == 3) {
    FILE *out = fopen(argv[2], "w");
    if (!out) { printf("denied: %s\n", strerror(errno)); return 1; }
    fputs("escaped\n", out);
    fclose(out);
    printf("ok\n");
    return 0;
  }
  if (!strcmp(cmd, "cat") && argc == 3) {
    FILE *in = fopen(argv[2], "r");
    if (!in) { printf("denied: %s\n", strerror(errno)); return 1; }
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, stdout);
    return 0;
  }
  if (!strcmp(cmd, "spin")) {
    volatile unsigned long counter = 0;
    for (;;) counter++;
  }
  if (!strcmp(cmd, "alloc") && argc == 3) {
    size_t bytes = (size_t)atoi(argv[2]) << 20;
    char *p = malloc(bytes);
    if (!p) { printf("out of memory\n"); return 12; }
    memset(p, 1, bytes);
    unsigned long sum = 0;
    for (size_t i = 0; i < bytes; i += 4096) sum += (unsigned char)p[i];
    printf("ok %lu\n", sum);
    return 0;
  }
  if (!strcmp(cmd, "poll2")) {
    __wasi_subscription_t subs[2] = {
      clock_sub(7, __WASI_CLOCKID_MONOTONIC, 5000000000ull, 0),
      clock_sub(9, __WASI_CLOCKID_MONOTONIC, 50000000ull, 0),
    };
    __wasi_event_t events[2];
    long long t0 = now_ms(CLOCK_MONOTONIC);
    int n = poll_subs(subs, 2, events);
    printf("events %d first %llu elapsed %lld\n", n, (unsigned long long)events[0].userdata,
           now_ms(CLOCK_MONOTONIC) - t0);
    return 0;
  }
  if (!strcmp(cmd, "pollabs") && argc == 3) {
    long long ms = atoll(argv[2]);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    __wasi_timestamp_t deadline = (__wasi_timestamp_t)ts.tv_sec * 1000000000ull + ts.tv_nsec + ms * 1000000ull;
    __wasi_subscription_t sub = clock_sub(3, __WASI_CLOCKID_REALTIME, deadline, 1);
    __wasi_event_t event;
    long long t0 = now_ms(CLOCK_MONOTONIC);
    poll_subs(&sub, 1, &event);
    printf("elapsed %lld\n", now_ms(CLOCK_MONOTONIC) - t0);
    return 0;
  }
  if (!strcmp(cmd, "pollstdin") && argc == 3) {
    __wasi_subscription_t subs[2];
    subs[0] = clock_sub(1, __WASI_CLOCKID_MONOTONIC, (__wasi_timestamp_t)atoll(argv[2]) * 1000000ull, 0);
    memset(&subs[1], 0, sizeof subs[1]);
    subs[1].userdata = 2;
    subs[1].u.tag = __WASI_EVENTTYPE_FD_READ;
    subs[1].u.u.fd_read.file_descriptor = 0;
    __wasi_event_t events[2];
    int n = poll_subs(subs, 2, events);
    for (int i = 0; i < n; i++) printf("%s\n", events[i].userdata == 2 ? "stdin" : "timeout");
    return 0;
  }
  if (!strcmp(cmd, "yield") && argc == 3) {
    for (int i = atoi(argv[2]); i > 0; i--) sched_yield();
    printf("yielded\n");
    return 0;
  }
  if (!strcmp(cmd, "trap")) __builtin_trap();
  if (!strcmp(cmd, "env") && argc == 3) {
    const char *value = getenv(argv[2]);
    if (!value) return 1;
    printf("%s\n", value);
    return 0;
  }
  if (!strcmp(cmd, "flood") && argc == 4) {
    size_t total = (size_t)atol(argv[2]), chunk = (size_t)atol(argv[3]), done = 0;
    char *buf = malloc(chunk);
    if (!buf) return 12;
    while (done < total) {
      size_t n = total - done < chunk ? total - done : chunk;
      for (size_t i = 0; i < n; i++) buf[i] = (char)((done + i) % 251);
      ssize_t wrote = write(1, buf, n);
      if (wrote < 0) {
        fprintf(stderr, "flood: %s after %zu bytes\n", strerror(errno), done);
        return errno == EPIPE ? 3 : 1;
      }
      done += (size_t)wrote;
    }
    printf("flooded %zu\n", done);
    return 0;
  }
  fprintf(stderr, "unknown command: %s\n", cmd);
  return 64;
}
