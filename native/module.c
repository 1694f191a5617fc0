/* The Python module kwasm.runtime._native: wasmtime's function addresses and the method table. */
#include "kwasm_native.h"

caller_context_fn caller_context;
context_get_data_fn context_get_data;
memory_data_fn memory_data;
memory_data_size_fn memory_data_size;
future_poll_fn future_poll;
set_epoch_deadline_fn set_epoch_deadline;
void *flag_is_set;
size_t val_size, val_payload;

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
    PyModuleDef_HEAD_INIT, "kwasm.runtime._native", "The engine's per-wake-up hot path (see native/kwasm_native.h).", -1,
    native_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&TimerHeapType) < 0)
        return NULL;
    if (cells_init() < 0)
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

