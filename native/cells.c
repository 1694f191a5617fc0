/* Guest cells: one native record per guest, handed out from blocks that are never freed. */
#include "kwasm_native.h"

#include <string.h>
#include <time.h>

/* Cells come from blocks that are never freed: a timer entry that outlives its guest may still
 * read a recycled cell, and its (key, wait_seq) check then fails safely. */
#define CELLS_PER_BLOCK 4096
static cell_t *free_cells;
static PyThread_type_lock cells_lock;
static uint64_t seq_counter;
__thread uint64_t running_key;

int cells_init(void) {
    cells_lock = PyThread_allocate_lock();
    return cells_lock == NULL ? -1 : 0;
}

uint64_t next_seq(void) { return __atomic_add_fetch(&seq_counter, 1, __ATOMIC_RELAXED); }

double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

bool clock_ns(uint32_t id, uint64_t *out) {
    static const clockid_t ids[] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID,
                                    CLOCK_THREAD_CPUTIME_ID};
    struct timespec ts;
    if (id > 3 || clock_gettime(ids[id], &ts) != 0)
        return false;
    *out = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return true;
}

cell_t *cell_of(PyObject *address) {
    void *cell = PyLong_AsVoidPtr(address);
    if (cell == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "null guest cell");
    return cell;
}


PyObject *native_cell_new(PyObject *module, PyObject *arg) {
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

PyObject *native_cell_free(PyObject *module, PyObject *address) {
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

PyObject *native_cell_set_store(PyObject *module, PyObject *args) {
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

PyObject *native_cell_set_future(PyObject *module, PyObject *args) {
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

PyObject *native_cell_set_outputs(PyObject *module, PyObject *args) {
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

PyObject *native_cell_new_wait(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    cell->wait_seq = next_seq();
    cell->flag = 0;
    return PyLong_FromUnsignedLongLong(cell->wait_seq);
}

PyObject *native_cell_wait(PyObject *module, PyObject *address) {
    (void)module;
    cell_t *cell = cell_of(address);
    if (cell == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(cell->wait_seq);
}


PyObject *native_running_key(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(running_key);
}

PyObject *native_set_running_key(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    running_key = key;
    Py_RETURN_NONE;
}

