/* poll_oneoff, clock_time_get and fd_write as wasmtime async host functions (see kwasm_native.h). */
#include "kwasm_native.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#define MAX_IOVS 1024 /* Linux's IOV_MAX: writev(2) refuses more */

static uint32_t arg_u32(const uint8_t *args, size_t index) {
    uint32_t value;
    memcpy(&value, args + index * val_size + val_payload, 4);
    return value;
}

static void set_result(uint8_t *results, int32_t value) {
    results[0] = 0; /* WASMTIME_I32 */
    memcpy(results + val_payload, &value, 4);
}

static bool always_ready(void *env) {
    (void)env;
    return true;
}

static void complete_now(continuation_t *cont) {
    cont->callback = (void *)always_ready;
    cont->env = NULL;
    cont->finalizer = NULL;
}

/* The calling guest's cell and memory, or false when the caller is not a kwasm guest with one. */
static bool guest_memory(void *caller, cell_t **cell, uint8_t **base, size_t *size) {
    void *context = caller_context(caller);
    *cell = context_get_data(context);
    if (*cell == NULL || (*cell)->memory == NULL)
        return false;
    *base = memory_data(context, (*cell)->memory);
    *size = memory_data_size(context, (*cell)->memory);
    return true;
}

/* poll_oneoff(in, out, nsubscriptions, *nevents): one relative or absolute sleep on the realtime or
 * monotonic clock is served here; anything else goes to the Python implementation (env). */
void poll_oneoff(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
                        size_t nresults, void **trap, continuation_t *cont) {
    cell_t *cell;
    uint8_t *base;
    size_t size;
    TimerHeap *heap = thread_heap;
    uint64_t sub = arg_u32(args, 0), event = arg_u32(args, 1), nevents = arg_u32(args, 3);
    /* Only on the thread of the guest's own scheduler: its heap is the one that will run it. */
    if (heap != NULL && arg_u32(args, 2) == 1 && guest_memory(caller, &cell, &base, &size) && cell->heap == heap &&
        sub + 48 <= size && event + 32 <= size && nevents + 4 <= size) {
        uint64_t userdata, timeout, now = 0;
        uint32_t clock;
        uint16_t flags;
        memcpy(&userdata, base + sub, 8);
        memcpy(&clock, base + sub + 16, 4);
        memcpy(&timeout, base + sub + 24, 8);
        memcpy(&flags, base + sub + 40, 2);
        if (base[sub + 8] == 0 /* clock */ && clock <= 1 /* realtime, monotonic */) {
            if (flags & 1) { /* absolute */
                clock_ns(clock, &now);
                timeout = timeout > now ? timeout - now : 0;
            }
            memset(base + event, 0, 32);
            memcpy(base + event, &userdata, 8); /* errno 0, type clock, nbytes 0, flags 0 */
            uint32_t one = 1;
            memcpy(base + nevents, &one, 4);
            set_result(results, ERRNO_SUCCESS);
            if (timeout == 0) {
                complete_now(cont);
                return;
            }
            cell->wait_seq = next_seq();
            cell->flag = 0;
            if (heap_push(heap, monotonic_now() + (double)timeout / 1e9, cell->wait_seq, cell->key, cell)) {
                cont->callback = flag_is_set;
                cont->env = cell;
                cont->finalizer = NULL;
                return;
            }
            cell->flag = 1; /* out of memory for the timer: wake at once rather than never */
            complete_now(cont);
            return;
        }
    }
    ((host_fn)env)(NULL, caller, args, nargs, results, nresults, trap, cont);
}

/* clock_time_get(id, precision, *time): the host clocks, without entering Python. */
void clock_time_get(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
                           size_t nresults, void **trap, continuation_t *cont) {
    cell_t *cell;
    uint8_t *base;
    size_t size = 0;
    uint64_t now, pointer = arg_u32(args, 2);
    (void)env, (void)nargs, (void)nresults, (void)trap;
    if (!clock_ns(arg_u32(args, 0), &now))
        set_result(results, ERRNO_INVAL);
    else if (!guest_memory(caller, &cell, &base, &size) || pointer + 8 > size)
        set_result(results, ERRNO_FAULT);
    else {
        memcpy(base + pointer, &now, 8);
        set_result(results, ERRNO_SUCCESS);
    }
    complete_now(cont);
}

/* fd_write(fd, iovs, iovs_len, *nwritten) on a FIFO stdout/stderr: one non-blocking writev(2) from
 * guest memory. A full pipe with nothing written goes to the Python implementation (env), which
 * suspends the guest until the pipe is writable; a short write is reported as such (the guest's
 * write loop sends the rest). Other fds go to Python too (it calls wasmtime's built-in fd_write). */
void fd_write(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
                     size_t nresults, void **trap, continuation_t *cont) {
    cell_t *cell;
    uint8_t *base;
    size_t size;
    uint32_t fd = arg_u32(args, 0), count = arg_u32(args, 2);
    uint64_t iovs = arg_u32(args, 1), nwritten = arg_u32(args, 3);
    if ((fd == 1 || fd == 2) && guest_memory(caller, &cell, &base, &size) && cell->outputs[fd - 1] >= 0) {
        /* Per thread, not on the stack: host functions run on the guest's fiber stack, and every
         * page touched there stays resident for as long as the guest lives. */
        static __thread struct iovec vectors[MAX_IOVS];
        if (count > MAX_IOVS) {
            set_result(results, ERRNO_INVAL);
            complete_now(cont);
            return;
        }
        bool in_bounds = iovs + 8 * (uint64_t)count <= size && nwritten + 4 <= size;
        for (uint32_t i = 0; in_bounds && i < count; i++) {
            uint32_t pointer, length;
            memcpy(&pointer, base + iovs + 8 * i, 4);
            memcpy(&length, base + iovs + 8 * i + 4, 4);
            in_bounds = (uint64_t)pointer + length <= size;
            vectors[i].iov_base = base + pointer;
            vectors[i].iov_len = length;
        }
        if (!in_bounds) {
            set_result(results, ERRNO_FAULT);
            complete_now(cont);
            return;
        }
        ssize_t written = count ? writev(cell->outputs[fd - 1], vectors, (int)count) : 0;
        if (written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ((host_fn)env)(NULL, caller, args, nargs, results, nresults, trap, cont);
            return;
        }
        if (written < 0) {
            set_result(results, errno == EPIPE ? ERRNO_PIPE : ERRNO_IO);
        } else {
            uint32_t done = (uint32_t)written;
            memcpy(base + nwritten, &done, 4);
            set_result(results, ERRNO_SUCCESS);
        }
        complete_now(cont);
        return;
    }
    ((host_fn)env)(NULL, caller, args, nargs, results, nresults, trap, cont);
}
