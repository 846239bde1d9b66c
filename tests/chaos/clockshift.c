/* Shifts CLOCK_REALTIME of one process by an offset read from a file; CLOCK_MONOTONIC is untouched.
 *
 * LD_PRELOAD=clockshift.so CLOCKSHIFT_FILE=/path/offset  (the file holds a signed number of
 * milliseconds; it is re-read at most every 50 ms of monotonic time, so a test steps the clock by
 * rewriting it). Interposes clock_gettime, gettimeofday and time. libfaketime does more and hangs
 * threading.Event.wait here; this does only the wall clock.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static long long offset_ms;
static long long next_read_ns;

static void resolve(void) {
    if (!real_clock_gettime)
        real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
}

static long long current_offset_ms(void) {
    struct timespec mono;
    resolve();
    real_clock_gettime(CLOCK_MONOTONIC, &mono);
    long long now_ns = (long long)mono.tv_sec * 1000000000LL + mono.tv_nsec;
    if (now_ns >= next_read_ns) {
        next_read_ns = now_ns + 50000000LL;
        const char *path = getenv("CLOCKSHIFT_FILE");
        FILE *f = path ? fopen(path, "r") : NULL;
        if (f) {
            long long v;
            if (fscanf(f, "%lld", &v) == 1)
                offset_ms = v;
            fclose(f);
        }
    }
    return offset_ms;
}

static void shift(struct timespec *ts, long long ms) {
    long long ns = (long long)ts->tv_nsec + (ms % 1000) * 1000000LL;
    ts->tv_sec += ms / 1000 + ns / 1000000000LL;
    ns %= 1000000000LL;
    if (ns < 0) {
        ns += 1000000000LL;
        ts->tv_sec -= 1;
    }
    ts->tv_nsec = ns;
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    resolve();
    int rc = real_clock_gettime(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE))
        shift(ts, current_offset_ms());
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    if (tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
