/*
 * kwasm.runtime._native: the engine's per-wake-up hot path in C (see docs/engine.md, "The wake-up
 * hot path"). Shared declarations of its four files:
 *
 *   cells.c      guest cells: the native record of one guest, the data pointer of its wasmtime store
 *   hostcalls.c  poll_oneoff, clock_time_get and fd_write as wasmtime async host functions
 *   timers.c     a timer heap per scheduler thread that wakes and runs due guests
 *   module.c     the Python module: wasmtime's function addresses, the method table
 *
 * wasmtime's functions are reached through addresses handed over by kwasm/runtime/ffi/_base.py
 * (init), so nothing here links against libwasmtime or needs its headers; the few ABI facts used
 * (continuation struct, wasmtime_val_t size and payload offset, subscription and event layouts)
 * are those of the wasmtime C API and WASI preview1.
 */
#ifndef KWASM_NATIVE_H
#define KWASM_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>

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

/* Set once by init() (module.c). */
extern caller_context_fn caller_context;
extern context_get_data_fn context_get_data;
extern memory_data_fn memory_data;
extern memory_data_size_fn memory_data_size;
extern future_poll_fn future_poll;
extern set_epoch_deadline_fn set_epoch_deadline;
extern void *flag_is_set; /* libc strlen: 1 when a cell's flag byte is set, else 0 */
extern size_t val_size, val_payload;

enum { ERRNO_SUCCESS = 0, ERRNO_FAULT = 21, ERRNO_INVAL = 28, ERRNO_IO = 29, ERRNO_PIPE = 64 };
enum { KIND_TIMED_OUT = 0, KIND_FINISHED = 1, KIND_RUNNABLE = 2 };
#define TIMEOUT_SEQ UINT64_MAX

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

/* cells.c */
extern __thread uint64_t running_key; /* the key of the guest this thread runs */
int cells_init(void);
uint64_t next_seq(void);
double monotonic_now(void);
bool clock_ns(uint32_t id, uint64_t *out);
cell_t *cell_of(PyObject *address);
PyObject *native_cell_new(PyObject *module, PyObject *arg);
PyObject *native_cell_free(PyObject *module, PyObject *address);
PyObject *native_cell_set_store(PyObject *module, PyObject *args);
PyObject *native_cell_set_future(PyObject *module, PyObject *args);
PyObject *native_cell_set_outputs(PyObject *module, PyObject *args);
PyObject *native_cell_new_wait(PyObject *module, PyObject *address);
PyObject *native_cell_wait(PyObject *module, PyObject *address);
PyObject *native_running_key(PyObject *module, PyObject *unused);
PyObject *native_set_running_key(PyObject *module, PyObject *arg);

/* hostcalls.c */
void poll_oneoff(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results, size_t nresults,
                 void **trap, continuation_t *cont);
void clock_time_get(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results,
                    size_t nresults, void **trap, continuation_t *cont);
void fd_write(void *env, void *caller, const uint8_t *args, size_t nargs, uint8_t *results, size_t nresults,
              void **trap, continuation_t *cont);

/* timers.c */
extern __thread TimerHeap *thread_heap; /* the heap of the scheduler running on this thread */
extern PyTypeObject TimerHeapType;
bool heap_push(TimerHeap *heap, double due, uint64_t seq, uint64_t key, cell_t *cell);
PyObject *native_poll(PyObject *module, PyObject *address);

#endif
