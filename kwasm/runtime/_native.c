/*
 * kwasm.runtime._native: the engine's per-wake-up hot path in C.
 *
 * A sleeping guest wakes, runs until its next sleep and goes back to sleep many thousand times a
 * second. In Python each round cost ~10 us of interpreter time under one GIL; here it costs none:
 *
 *   - a guest cell: the native record of one guest (wake-up flag, wait sequence, store context,
 *     memory handle, call future), the data pointer of the guest's wasmtime store;
 *   - poll_oneoff, clock_time_get and fd_write as wasmtime async host functions: a plain sleep (one
 *     clock subscription) is answered here and queued on the calling thread's timer heap, a write to
 *     a FIFO stdout/stderr goes straight to the pipe; every other call (or a full pipe) is handed to
 *     the Python implementation whose ctypes callback is the function's env;
 *   - a timer heap per scheduler thread whose run_due() wakes and runs every due guest without
 *     entering Python, and reports only what needs Python (a finished guest, a timeout, a guest
 *     that yielded or still waits on a Python continuation).
 *
 * wasmtime's functions are reached through addresses handed over by kwasm/runtime/ffi/_base.py (init),
 * so nothing here links against libwasmtime or needs its headers; the few ABI facts used
 * (continuation struct, wasmtime_val_t size and payload offset, subscription and event layouts)
 * are those of the wasmtime C API and WASI preview1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

typedef struct {
    void *callback;
    void *env;
    void *finalizer;
} continuation_t; /* wasmtime_async_continuation_t */

typedef void (*host_fn)(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
                        size_t nresults, void **trap, continuation_t *cont);
typedef void *(*caller_context_fn)(void *caller);
typedef void *(*context_get_data_fn)(const void *context);
typedef uint8_t *(*memory_data_fn)(const void *context, const void *memory);
typedef size_t (*memory_data_size_fn)(const void *context, const void *memory);
typedef bool (*future_poll_fn)(void *future);
typedef void (*set_epoch_deadline_fn)(void *context, uint64_t ticks);

static caller_context_fn caller_context;
static context_get_data_fn context_get_data;
static memory_data_fn memory_data;
static memory_data_size_fn memory_data_size;
static future_poll_fn future_poll;
static set_epoch_deadline_fn set_epoch_deadline;
static void *flag_is_set; /* libc strlen: 1 when a cell's flag byte is set, else 0 */
static size_t val_size, val_payload;

enum { ERRNO_SUCCESS = 0, ERRNO_FAULT = 21, ERRNO_INVAL = 28, ERRNO_IO = 29, ERRNO_PIPE = 64 };
#define MAX_IOVS 1024 /* Linux's IOV_MAX: writev(2) refuses more */
enum { KIND_TIMED_OUT = 0, KIND_FINISHED = 1, KIND_RUNNABLE = 2 };
#define TIMEOUT_SEQ UINT64_MAX

/* ---- guest cells ------------------------------------------------------------------------- */

typedef struct cell {
    char flag; /* set: the current wait is over (strlen sees 1) */
    char nul;  /* always 0: ends the flag for strlen */
    char pad[6];
    uint64_t wait_seq; /* the current wait; drawn from one global counter, never reused */
    uint64_t key;      /* the guest's id (what Python's host calls look the guest up by) */
    void *context;     /* wasmtime_context_t * of the guest's store */
    void *memory;      /* address of the guest's pinned wasmtime_memory_t, or NULL */
    void *future;      /* wasmtime_call_future_t * of its _start, or NULL before the first run */
    void *heap;        /* the TimerHeap of the scheduler that runs it, or NULL before it is adopted */
    int outputs[2];    /* non-blocking host fds behind guest fds 1 and 2 (FIFOs), or -1 */
    struct cell *next_free;
} cell_t;

/* Cells come from blocks that are never freed: a timer entry that outlives its guest may still
 * read a recycled cell, and its (key, wait_seq) check then fails safely. */
#define CELLS_PER_BLOCK 4096
static cell_t *free_cells;
static PyThread_type_lock cells_lock;
static uint64_t seq_counter;
static __thread uint64_t running_key;

static uint64_t next_seq(void) { return __atomic_add_fetch(&seq_counter, 1, __ATOMIC_RELAXED); }

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool clock_ns(uint32_t id, uint64_t *out) {
    static const clockid_t ids[] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID,
                                    CLOCK_THREAD_CPUTIME_ID};
    struct timespec ts;
    if (id > 3 || clock_gettime(ids[id], &ts) != 0)
        return false;
    *out = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return true;
}

static cell_t *cell_of(PyObject *address) {
    void *cell = PyLong_AsVoidPtr(address);
    if (cell == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "null guest cell");
    return cell;
}

/* ---- timer heap ---------------------------------------------------------------------------- */

typedef struct {
    double due;
    uint64_t seq;
    uint64_t key;
    cell_t *cell;
} timer_t_;

typedef struct {
    PyObject_HEAD
    timer_t_ *items;
    size_t len, cap;
} TimerHeap;

static __thread TimerHeap *thread_heap; /* the heap of the scheduler running on this thread */

static bool heap_push(TimerHeap *heap, double due, uint64_t seq, uint64_t key, cell_t *cell) {
    if (heap->len == heap->cap) {
        size_t cap = heap->cap ? heap->cap * 2 : 1024;
        timer_t_ *items = realloc(heap->items, cap * sizeof *items);
        if (items == NULL)
            return false;
        heap->items = items;
        heap->cap = cap;
    }
    size_t i = heap->len++;
    timer_t_ item = {due, seq, key, cell};
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (heap->items[parent].due <= due)
            break;
        heap->items[i] = heap->items[parent];
        i = parent;
    }
    heap->items[i] = item;
    return true;
}

static timer_t_ heap_pop(TimerHeap *heap) {
    timer_t_ top = heap->items[0];
    timer_t_ last = heap->items[--heap->len];
    size_t i = 0, n = heap->len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && heap->items[child + 1].due < heap->items[child].due)
            child++;
        if (last.due <= heap->items[child].due)
            break;
        heap->items[i] = heap->items[child];
        i = child;
    }
    if (n)
        heap->items[i] = last;
    return top;
}

/* ---- the async host functions -------------------------------------------------------------- */

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
static void poll_oneoff(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
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
static void clock_time_get(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
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
static void fd_write(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
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

/* ---- running a guest ----------------------------------------------------------------------- */

/* One slice of a guest (a fresh epoch tick); true once its _start has finished. GIL released. */
static bool run_slice(cell_t *cell) {
    bool done;
    running_key = cell->key;
    set_epoch_deadline(cell->context, 1);
    Py_BEGIN_ALLOW_THREADS
    done = future_poll(cell->future);
    Py_END_ALLOW_THREADS
    return done;
}

static int append_event(PyObject *events, int kind, uint64_t key) {
    PyObject *item = Py_BuildValue("(iK)", kind, (unsigned long long)key);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(events, item);
    Py_DECREF(item);
    return rc;
}

static int append_lag(PyObject *lags, double due) {
    if (lags == Py_None)
        return 0;
    PyObject *lag = PyFloat_FromDouble(monotonic_now() - due);
    if (lag == NULL)
        return -1;
    int rc = PyList_Append(lags, lag);
    Py_DECREF(lag);
    return rc;
}

static PyObject *TimerHeap_run_due(TimerHeap *self, PyObject *args) {
    double now;
    PyObject *lags;
    if (!PyArg_ParseTuple(args, "dO", &now, &lags))
        return NULL;
    if (lags != Py_None && !PyList_Check(lags)) {
        PyErr_SetString(PyExc_TypeError, "lags must be a list or None");
        return NULL;
    }
    PyObject *events = PyList_New(0);
    if (events == NULL)
        return NULL;
    size_t budget = self->len; /* entries pushed while running are not due before `now` anyway */
    while (budget-- && self->len && self->items[0].due <= now) {
        timer_t_ timer = heap_pop(self);
        cell_t *cell = timer.cell;
        if (timer.seq == TIMEOUT_SEQ) {
            if (append_event(events, KIND_TIMED_OUT, timer.key) < 0)
                goto fail;
            continue;
        }
        if (cell->key != timer.key || cell->wait_seq != timer.seq || cell->flag)
            continue; /* a wait that already ended, or a cell that now serves another guest */
        cell->flag = 1;
        if (append_lag(lags, timer.due) < 0)
            goto fail;
        if (cell->future == NULL) {
            if (append_event(events, KIND_RUNNABLE, timer.key) < 0)
                goto fail;
            continue;
        }
        uint64_t seq = cell->wait_seq;
        if (run_slice(cell)) {
            if (append_event(events, KIND_FINISHED, timer.key) < 0)
                goto fail;
        } else if (cell->wait_seq == seq && append_event(events, KIND_RUNNABLE, timer.key) < 0)
            goto fail; /* it yielded on an epoch tick, or waits on a Python continuation */
    }
    return events;
fail:
    Py_DECREF(events);
    return NULL;
}

static PyObject *TimerHeap_push(TimerHeap *self, PyObject *args) {
    double due;
    unsigned long long seq, key;
    PyObject *address;
    if (!PyArg_ParseTuple(args, "dKKO", &due, &seq, &key, &address))
        return NULL;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    if (!heap_push(self, due, seq, key, cell))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *TimerHeap_push_timeout(TimerHeap *self, PyObject *args) {
    double due;
    unsigned long long key;
    if (!PyArg_ParseTuple(args, "dK", &due, &key))
        return NULL;
    if (!heap_push(self, due, TIMEOUT_SEQ, key, NULL))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *TimerHeap_adopt(TimerHeap *self, PyObject *address) {
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->heap = self;
    Py_RETURN_NONE;
}

static PyObject *TimerHeap_next_due(TimerHeap *self, PyObject *unused) {
    (void)unused;
    if (self->len == 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->items[0].due);
}

static PyObject *TimerHeap_bind(TimerHeap *self, PyObject *unused) {
    (void)unused;
    thread_heap = self;
    Py_RETURN_NONE;
}

static PyObject *TimerHeap_unbind(TimerHeap *self, PyObject *unused) {
    (void)unused;
    if (thread_heap == self)
        thread_heap = NULL;
    Py_RETURN_NONE;
}

static Py_ssize_t TimerHeap_len(TimerHeap *self) { return (Py_ssize_t)self->len; }

static void TimerHeap_dealloc(TimerHeap *self) {
    if (thread_heap == self)
        thread_heap = NULL;
    free(self->items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef TimerHeap_methods[] = {
    {"run_due", (PyCFunction)TimerHeap_run_due, METH_VARARGS,
     "run_due(now, lags) -> [(kind, key)]: wake and run every guest due by now; report what needs Python."},
    {"push", (PyCFunction)TimerHeap_push, METH_VARARGS, "push(due, seq, key, cell): end wait seq of a guest at due."},
    {"push_timeout", (PyCFunction)TimerHeap_push_timeout, METH_VARARGS,
     "push_timeout(due, key): report guest key as timed out at due."},
    {"adopt", (PyCFunction)TimerHeap_adopt, METH_O, "adopt(cell): its guest runs on this heap's thread from now on."},
    {"next_due", (PyCFunction)TimerHeap_next_due, METH_NOARGS, "The earliest due time, or None."},
    {"bind", (PyCFunction)TimerHeap_bind, METH_NOARGS, "Make this the calling thread's heap (for poll_oneoff)."},
    {"unbind", (PyCFunction)TimerHeap_unbind, METH_NOARGS, "Undo bind() on the calling thread."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods TimerHeap_as_sequence = {.sq_length = (lenfunc)TimerHeap_len};

static PyTypeObject TimerHeapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kwasm.runtime._native.TimerHeap",
    .tp_basicsize = sizeof(TimerHeap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A scheduler thread's timers: a binary heap of (due, wait, guest cell).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)TimerHeap_dealloc,
    .tp_methods = TimerHeap_methods,
    .tp_as_sequence = &TimerHeap_as_sequence,
};

/* ---- module functions ---------------------------------------------------------------------- */

static PyObject *native_init(PyObject *module, PyObject *args) {
    unsigned long long a[7], size, payload;
    (void)module;
    if (!PyArg_ParseTuple(args, "KKKKKKKKK", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &size, &payload))
        return NULL;
    caller_context = (caller_context_fn)(uintptr_t)a[0];
    context_get_data = (context_get_data_fn)(uintptr_t)a[1];
    memory_data = (memory_data_fn)(uintptr_t)a[2];
    memory_data_size = (memory_data_size_fn)(uintptr_t)a[3];
    future_poll = (future_poll_fn)(uintptr_t)a[4];
    set_epoch_deadline = (set_epoch_deadline_fn)(uintptr_t)a[5];
    flag_is_set = (void *)(uintptr_t)a[6];
    val_size = (size_t)size;
    val_payload = (size_t)payload;
    Py_RETURN_NONE;
}

static PyObject *native_cell_new(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    PyThread_acquire_lock(cells_lock, WAIT_LOCK);
    if (free_cells == NULL) {
        cell_t *block = calloc(CELLS_PER_BLOCK, sizeof *block);
        if (block == NULL) {
            PyThread_release_lock(cells_lock);
            return PyErr_NoMemory();
        }
        for (size_t i = 0; i < CELLS_PER_BLOCK; i++) {
            block[i].next_free = free_cells;
            free_cells = &block[i];
        }
    }
    cell_t *cell = free_cells;
    free_cells = cell->next_free;
    PyThread_release_lock(cells_lock);
    memset(cell, 0, sizeof *cell);
    cell->outputs[0] = cell->outputs[1] = -1;
    cell->wait_seq = next_seq(); /* newer than any timer or fd wait still naming this cell */
    cell->key = key;
    return PyLong_FromVoidPtr(cell);
}

static PyObject *native_cell_free(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->key = 0;
    cell->future = cell->context = cell->memory = NULL;
    cell->outputs[0] = cell->outputs[1] = -1;
    PyThread_acquire_lock(cells_lock, WAIT_LOCK);
    cell->next_free = free_cells;
    free_cells = cell;
    PyThread_release_lock(cells_lock);
    Py_RETURN_NONE;
}

static PyObject *native_cell_set_store(PyObject *module, PyObject *args) {
    PyObject *address;
    unsigned long long context, memory;
    (void)module;
    if (!PyArg_ParseTuple(args, "OKK", &address, &context, &memory))
        return NULL;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->context = (void *)(uintptr_t)context;
    cell->memory = (void *)(uintptr_t)memory;
    Py_RETURN_NONE;
}

static PyObject *native_cell_set_future(PyObject *module, PyObject *args) {
    PyObject *address;
    unsigned long long future;
    (void)module;
    if (!PyArg_ParseTuple(args, "OK", &address, &future))
        return NULL;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->future = (void *)(uintptr_t)future;
    Py_RETURN_NONE;
}

static PyObject *native_cell_set_outputs(PyObject *module, PyObject *args) {
    PyObject *address;
    int stdout_fd, stderr_fd;
    (void)module;
    if (!PyArg_ParseTuple(args, "Oii", &address, &stdout_fd, &stderr_fd))
        return NULL;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->outputs[0] = stdout_fd;
    cell->outputs[1] = stderr_fd;
    Py_RETURN_NONE;
}

static PyObject *native_cell_new_wait(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->wait_seq = next_seq();
    cell->flag = 0;
    return PyLong_FromUnsignedLongLong(cell->wait_seq);
}

static PyObject *native_cell_wait(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(cell->wait_seq);
}

static PyObject *native_poll(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    if (cell->future == NULL || cell->context == NULL) {
        PyErr_SetString(PyExc_ValueError, "guest cell has no call future");
        return NULL;
    }
    return PyBool_FromLong(run_slice(cell));
}

static PyObject *native_running_key(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(running_key);
}

static PyObject *native_set_running_key(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    running_key = key;
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"init", native_init, METH_VARARGS, "Hand over the wasmtime and libc function addresses and wasmtime_val_t's layout."},
    {"cell_new", native_cell_new, METH_O, "cell_new(key) -> address of a zeroed guest cell for guest key."},
    {"cell_free", native_cell_free, METH_O, "Return a cell (its guest is gone)."},
    {"cell_set_store", native_cell_set_store, METH_VARARGS,
     "cell_set_store(cell, context, memory): the guest's store context and pinned memory handle (0: none)."},
    {"cell_set_future", native_cell_set_future, METH_VARARGS, "cell_set_future(cell, future): its _start call (0: none)."},
    {"cell_set_outputs", native_cell_set_outputs, METH_VARARGS,
     "cell_set_outputs(cell, stdout_fd, stderr_fd): the FIFO fds the native fd_write writes to (-1: none)."},
    {"cell_new_wait", native_cell_new_wait, METH_O, "Start a new wait: a fresh sequence number, flag cleared."},
    {"cell_wait", native_cell_wait, METH_O, "The sequence number of the cell's current wait."},
    {"poll", native_poll, METH_O, "Run one slice of the guest of a bound cell; True once it has finished."},
    {"running_key", native_running_key, METH_NOARGS, "The key of the guest this thread runs (for host calls)."},
    {"set_running_key", native_set_running_key, METH_O, "Set it (before instantiating a guest)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "kwasm.runtime._native", "The engine's per-wake-up hot path (see _native.c).", -1,
    native_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&TimerHeapType) < 0)
        return NULL;
    cells_lock = PyThread_allocate_lock();
    if (cells_lock == NULL)
        return PyErr_NoMemory();
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&TimerHeapType);
    if (PyModule_AddObject(module, "TimerHeap", (PyObject *)&TimerHeapType) < 0 ||
        PyModule_AddObject(module, "POLL_ONEOFF", PyLong_FromVoidPtr((void *)poll_oneoff)) < 0 ||
        PyModule_AddObject(module, "CLOCK_TIME_GET", PyLong_FromVoidPtr((void *)clock_time_get)) < 0 ||
        PyModule_AddObject(module, "FD_WRITE", PyLong_FromVoidPtr((void *)fd_write)) < 0 ||
        PyModule_AddIntConstant(module, "TIMED_OUT", KIND_TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(module, "FINISHED", KIND_FINISHED) < 0 ||
        PyModule_AddIntConstant(module, "RUNNABLE", KIND_RUNNABLE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
