/* A timer heap per scheduler thread that wakes and runs due guests without entering Python. */
#include "kwasm_native.h"

__thread TimerHeap *thread_heap;

bool heap_push(TimerHeap *heap, double due, uint64_t seq, uint64_t key, cell_t *cell) {
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

PyTypeObject TimerHeapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kwasm.runtime._native.TimerHeap",
    .tp_basicsize = sizeof(TimerHeap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A scheduler thread's timers: a binary heap of (due, wait, guest cell).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)TimerHeap_dealloc,
    .tp_methods = TimerHeap_methods,
};

PyObject *native_poll(PyObject *module, PyObject *address) {
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

