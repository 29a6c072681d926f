/* bufpool._speedups: the memory core's hot paths in C (CPython C API, no build dependency).
 *
 * What it holds
 *   Lease      the lease type itself (same attributes, errors and messages as the pure-Python
 *              bufpool._lease.PyLease); its view is made on first use of ``.view``.
 *   PoolCore   base class of BufferPool: ``acquire`` (hit path in C) and the fields the hot
 *              paths read (``_tiers``, ``_lock``, ``_slow_release``, sampling countdown).
 *   TierCore   base class of bufpool._tier.Tier: the per-class counters as C integers.
 *   FastLock   the pool lock; its ``held`` flag is what lets C take the hit paths without
 *              taking the lock (see "Thread safety").
 *
 * Worst case: acquire and release are O(classes) (a linear scan of a handful of sizes) plus
 * O(1) list work; everything else (misses, growth, spill, heap, waiters, scrub, leaks) is
 * delegated to the pure-Python code in bufpool._pool / bufpool._lease, unchanged.
 *
 * View tracking: identical to the pure-Python core (bufpool._tracking).  A lease's view is a
 * memoryview of the slot bytearray, so every view, slice or export keeps one reference to the
 * slot; on the last release the slot goes to the free list only when our reference is the
 * only one left (Py_REFCNT == 1), else to the class's quarantine list.
 *
 * Thread safety (GIL builds only; bufpool._impl never loads this module on a free-threaded
 * interpreter).  The pure-Python paths mutate pool state under ``pool._lock`` and may be
 * switched out mid-way.  The C hit paths run only when that lock is free (FastLock.held == 0)
 * and then never run Python code between reading and writing pool state: no allocation (which
 * could start the cyclic GC and so run finalizers), no call, no decref of an object whose
 * deallocation could run code.  Under the GIL such a stretch of C cannot be interleaved with
 * any other thread, so it is atomic with respect to every locked Python section.  When the
 * lock is held, C calls the pure-Python method, which takes the lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <stdint.h>
#include <stdio.h>

#if defined(Py_GIL_DISABLED)
#error "bufpool._speedups relies on the GIL; free-threaded builds use the pure-Python core"
#endif

/* ------------------------------------------------------------------ module state */

static PyObject *LeaseReleasedError = NULL; /* bufpool.LeaseReleasedError */
static PyObject *py_release = NULL;         /* bufpool._lease.release_locked */
static PyObject *bad_size = NULL;           /* bufpool._pool._bad_size */
static PyObject *pkg_dir = NULL;            /* bufpool._leak._PKG_DIR */
static Py_ssize_t site_depth = 6;           /* bufpool._leak.SITE_DEPTH */
#define MAX_SITE_DEPTH 64

static PyObject *str_acquire_slow, *str_oversize_lease, *str_retain, *str_on_leak, *str_tobytes;

static int
is_none(PyObject *o)
{
    return o == NULL || o == Py_None;
}

/* ------------------------------------------------------------------ FastLock */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    Py_ssize_t held;     /* recursion depth: 0 when free */
    unsigned long owner; /* thread ident while held */
} FastLock;

static PyTypeObject FastLockType;

static PyObject *
fastlock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":FastLock", kwlist)) {
        return NULL;
    }
    FastLock *self = (FastLock *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->held = 0;
    self->owner = 0;
    return (PyObject *)self;
}

static void
fastlock_dealloc(FastLock *self)
{
    if (self->lock != NULL) {
        if (self->held) {
            PyThread_release_lock(self->lock);
        }
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Blocks (GIL released) until the lock is ours, or the timeout (microseconds, -1 = none) ends.
 * Re-entrant like threading.RLock: the owner thread only counts up (a finalizer that the GC
 * runs inside one of the pool's locked sections must not deadlock; see Lease.release).
 * Not interruptible by signals: pool critical sections last microseconds. */
static int
fastlock_take(FastLock *self, PY_TIMEOUT_T timeout)
{
    unsigned long me = PyThread_get_thread_ident();
    if (self->held && self->owner == me) {
        self->held++;
        return 1;
    }
    PyLockStatus r = PyThread_acquire_lock_timed(self->lock, 0, 0);
    if (r != PY_LOCK_ACQUIRED && timeout != 0) {
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(self->lock, timeout, 0);
        Py_END_ALLOW_THREADS
    }
    if (r == PY_LOCK_ACQUIRED) {
        self->held = 1;
        self->owner = me;
        return 1;
    }
    return 0;
}

static void
fastlock_give(FastLock *self)
{
    if (--self->held == 0) {
        self->owner = 0;
        PyThread_release_lock(self->lock);
    }
}

static PyObject *
fastlock_acquire(FastLock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", kwlist, &blocking, &timeout)) {
        return NULL;
    }
    PY_TIMEOUT_T us;
    if (!blocking) {
        if (timeout != -1) {
            PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
            return NULL;
        }
        us = 0;
    }
    else if (timeout == -1) {
        us = -1;
    }
    else if (!(timeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    else if (timeout * 1e6 >= (double)PY_TIMEOUT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return NULL;
    }
    else {
        us = (PY_TIMEOUT_T)(timeout * 1e6);
    }
    return PyBool_FromLong(fastlock_take(self, us));
}

static PyObject *
fastlock_enter(FastLock *self, PyObject *Py_UNUSED(ignored))
{
    fastlock_take(self, -1);
    Py_RETURN_TRUE;
}

static PyObject *
fastlock_release(FastLock *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->held || self->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    fastlock_give(self);
    Py_RETURN_NONE;
}

static PyObject *
fastlock_exit(FastLock *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fastlock_release(self, NULL);
}

static PyObject *
fastlock_locked(FastLock *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->held != 0);
}

static PyObject *
fastlock_is_owned(FastLock *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->held && self->owner == PyThread_get_thread_ident());
}

static PyMethodDef fastlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))fastlock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool"},
    {"release", (PyCFunction)fastlock_release, METH_NOARGS, "Release the lock."},
    {"locked", (PyCFunction)fastlock_locked, METH_NOARGS, "True while some thread holds it."},
    {"_is_owned", (PyCFunction)fastlock_is_owned, METH_NOARGS,
     "True when the calling thread holds it (as threading.RLock._is_owned)."},
    {"__enter__", (PyCFunction)fastlock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))fastlock_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bufpool._speedups.FastLock",
    .tp_basicsize = sizeof(FastLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A re-entrant lock (like threading.RLock) whose state the C hot paths read.",
    .tp_new = fastlock_new,
    .tp_dealloc = (destructor)fastlock_dealloc,
    .tp_methods = fastlock_methods,
};

/* ------------------------------------------------------------------ TierCore */

typedef struct {
    PyObject_HEAD
    PyObject *free;       /* list[bytearray], LIFO */
    PyObject *quarantine; /* list[bytearray] */
    PyObject *waiters;    /* deque[Waiter] */
    PyObject *zeros;      /* bytes */
    Py_ssize_t index, size, slot_size, min_slots, chunk_slots, slots, in_use, high_water;
    Py_ssize_t hits, misses, spills, extra_served, requested_bytes;
} TierCore;

static PyTypeObject TierCoreType;

static int
tier_traverse(TierCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->free);
    Py_VISIT(self->quarantine);
    Py_VISIT(self->waiters);
    Py_VISIT(self->zeros);
    return 0;
}

static int
tier_clear(TierCore *self)
{
    Py_CLEAR(self->free);
    Py_CLEAR(self->quarantine);
    Py_CLEAR(self->waiters);
    Py_CLEAR(self->zeros);
    return 0;
}

static void
tier_dealloc(TierCore *self)
{
    PyObject_GC_UnTrack(self);
    tier_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define TIER_SSIZE(name) {#name, T_PYSSIZET, offsetof(TierCore, name), 0, NULL}
#define TIER_OBJ(name) {#name, T_OBJECT_EX, offsetof(TierCore, name), 0, NULL}

static PyMemberDef tier_members[] = {
    TIER_OBJ(free), TIER_OBJ(quarantine), TIER_OBJ(waiters), TIER_OBJ(zeros),
    TIER_SSIZE(index), TIER_SSIZE(size), TIER_SSIZE(slot_size), TIER_SSIZE(min_slots),
    TIER_SSIZE(chunk_slots), TIER_SSIZE(slots), TIER_SSIZE(in_use), TIER_SSIZE(high_water),
    TIER_SSIZE(hits), TIER_SSIZE(misses), TIER_SSIZE(spills), TIER_SSIZE(extra_served),
    TIER_SSIZE(requested_bytes),
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TierCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bufpool._speedups.TierCore",
    .tp_basicsize = sizeof(TierCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Fields of one size class (base of bufpool._tier.Tier); counters are C integers.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)tier_dealloc,
    .tp_traverse = (traverseproc)tier_traverse,
    .tp_clear = (inquiry)tier_clear,
    .tp_members = tier_members,
};

/* ------------------------------------------------------------------ PoolCore */

typedef struct {
    PyObject_HEAD
    FastLock *lock;
    PyObject *tiers; /* tuple[TierCore, ...] */
    Py_ssize_t ntiers;
    Py_ssize_t *slot_sizes;
    char slow_release;
    char sampling;
    Py_ssize_t countdown;
    Py_ssize_t interval;
} PoolCore;

static PyTypeObject PoolCoreType;

static PyObject *
pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PoolCore *self = (PoolCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->tiers = PyTuple_New(0);
    if (self->tiers == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->countdown = 1;
    self->interval = 1;
    return (PyObject *)self;
}

static int
pool_traverse(PoolCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tiers);
    return 0;
}

static int
pool_clear(PoolCore *self)
{
    self->ntiers = 0;
    Py_CLEAR(self->tiers);
    Py_CLEAR(self->lock);
    return 0;
}

static void
pool_dealloc(PoolCore *self)
{
    PyObject_GC_UnTrack(self);
    pool_clear(self);
    PyMem_Free(self->slot_sizes);
    self->slot_sizes = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
pool_get_tiers(PoolCore *self, void *closure)
{
    if (self->tiers == NULL) {
        return PyTuple_New(0);
    }
    return Py_NewRef(self->tiers);
}

static int
pool_set_tiers(PoolCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyTuple_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "_tiers must be a tuple of Tier objects");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(value);
    Py_ssize_t *sizes = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1));
    if (sizes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(value, i);
        if (!PyObject_TypeCheck(t, &TierCoreType)) {
            PyMem_Free(sizes);
            PyErr_SetString(PyExc_TypeError, "_tiers must be a tuple of Tier objects");
            return -1;
        }
        sizes[i] = ((TierCore *)t)->slot_size;
    }
    PyObject *old = self->tiers;
    PyMem_Free(self->slot_sizes);
    self->slot_sizes = sizes;
    self->tiers = Py_NewRef(value);
    self->ntiers = n;
    Py_XDECREF(old);
    return 0;
}

static PyObject *
pool_get_lock(PoolCore *self, void *closure)
{
    if (self->lock == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_lock");
        return NULL;
    }
    return Py_NewRef((PyObject *)self->lock);
}

static int
pool_set_lock(PoolCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyObject_TypeCheck(value, &FastLockType)) {
        PyErr_SetString(PyExc_TypeError, "_lock must be a bufpool._speedups.FastLock");
        return -1;
    }
    Py_XSETREF(self->lock, (FastLock *)Py_NewRef(value));
    return 0;
}

/* ------------------------------------------------------------------ acquisition sites */

/* Same tuple as bufpool._leak.capture_site(): up to site_depth (file, line, function) frames of
 * the caller, leading frames inside the bufpool package skipped.  (Called from C, the current
 * frame is already the caller's: C functions have no frame.) */
static PyObject *
capture_site(void)
{
    PyObject *items[MAX_SITE_DEPTH];
    Py_ssize_t n = 0;
    PyFrameObject *frame = PyEval_GetFrame();
    Py_XINCREF(frame);
    while (frame != NULL && n < site_depth) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        int keep = 1;
        if (n == 0 && pkg_dir != NULL) {
            Py_ssize_t m = PyUnicode_Tailmatch(code->co_filename, pkg_dir, 0, PY_SSIZE_T_MAX, -1);
            if (m < 0) {
                goto error_code;
            }
            keep = !m;
        }
        if (keep) {
            PyObject *item = Py_BuildValue("(OiO)", code->co_filename,
                                           PyFrame_GetLineNumber(frame), code->co_name);
            if (item == NULL) {
                goto error_code;
            }
            items[n++] = item;
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
        continue;
    error_code:
        Py_DECREF(code);
        Py_DECREF(frame);
        goto error;
    }
    Py_XDECREF(frame);
    PyObject *site = PyTuple_New(n);
    if (site == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(site, i, items[i]);
    }
    return site;
error:
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(items[i]);
    }
    return NULL;
}

/* ------------------------------------------------------------------ Lease */

typedef struct {
    PyObject_HEAD
    PoolCore *pool;
    PyObject *tier; /* TierCore, or None/NULL for a heap lease */
    PyObject *buf;  /* bytearray; None/NULL once released */
    PyObject *view; /* memoryview; NULL until first ``.view``; None/NULL once released */
    PyObject *site; /* tuple or None/NULL */
    Py_ssize_t size;
    Py_ssize_t refcount;
    PyObject *weaklist;
} Lease;

static PyTypeObject LeaseType;

/* Freed leases kept for reuse: saves the allocator round trip on every acquire.  Only leases
 * the GC never finalized go here (PyObject_GC_IsFinalized), so a reused object's leak report
 * still runs. */
#define LEASE_FREELIST_MAX 256
static Lease *lease_freelist[LEASE_FREELIST_MAX];
static int lease_nfree = 0;

static Lease *
lease_alloc(void)
{
    if (lease_nfree > 0) {
        Lease *self = lease_freelist[--lease_nfree];
        PyObject_Init((PyObject *)self, &LeaseType);
        return self;
    }
    return PyObject_GC_New(Lease, &LeaseType);
}

/* Free an untracked lease whose fields are cleared (or were never set). */
static void
lease_free(Lease *self)
{
    if (lease_nfree < LEASE_FREELIST_MAX && !PyObject_GC_IsFinalized((PyObject *)self)) {
        lease_freelist[lease_nfree++] = self;
        return;
    }
    PyObject_GC_Del(self);
}

static PyObject *
lease_repr(Lease *self)
{
    char addr[2 + 2 * sizeof(void *) + 1];
    snprintf(addr, sizeof(addr), "0x%" PRIxPTR, (uintptr_t)self);
    if (is_none(self->tier) || !PyObject_TypeCheck(self->tier, &TierCoreType)) {
        return PyUnicode_FromFormat("<Lease %zd B in heap, refcount %zd at %s>", self->size,
                                    self->refcount, addr);
    }
    return PyUnicode_FromFormat("<Lease %zd B in %zd-byte class, refcount %zd at %s>", self->size,
                                ((TierCore *)self->tier)->size, self->refcount, addr);
}

/* Raise LeaseReleasedError(fmt % (repr(self), refcount)); fmt holds %U then maybe %zd. */
static PyObject *
lease_error(Lease *self, const char *fmt)
{
    PyObject *r = lease_repr(self);
    if (r == NULL) {
        return NULL;
    }
    PyObject *msg = PyUnicode_FromFormat(fmt, r, self->refcount);
    Py_DECREF(r);
    if (msg != NULL) {
        PyErr_SetObject(LeaseReleasedError, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* The same message as bufpool._lease.PyLease.__new__: a lease made by hand would be an owner
 * of memory the pool never counted (its release drove heap_in_use negative). */
#define LEASE_NEW_MSG \
    "bufpool.Lease cannot be created directly: leases come from BufferPool.acquire(), " \
    "acquire_async(), acquire_chain() and acquire_chain_async()"

static PyObject *
lease_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, LEASE_NEW_MSG);
    return NULL;
}

/* 1 when the calling thread holds ``pool``'s lock; else 0 with RuntimeError set.  The module
 * functions that change a lease's state (below) are for the pool's locked sections only. */
static int
holds_pool_lock(PoolCore *pool, const char *what)
{
    if (pool != NULL && pool->lock != NULL && pool->lock->held
        && pool->lock->owner == PyThread_get_thread_ident()) {
        return 1;
    }
    PyErr_Format(PyExc_RuntimeError,
                 "bufpool internal: %s changes lease state only inside its pool's locked "
                 "sections", what);
    return 0;
}

static int
lease_traverse(Lease *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pool);
    Py_VISIT(self->tier);
    Py_VISIT(self->buf);
    Py_VISIT(self->view);
    Py_VISIT(self->site);
    return 0;
}

static int
lease_clear(Lease *self)
{
    Py_CLEAR(self->view);
    Py_CLEAR(self->buf);
    Py_CLEAR(self->tier);
    Py_CLEAR(self->site);
    Py_CLEAR(self->pool);
    return 0;
}

/* A lease collected while still owned: report it to the pool like PyLease.__del__ does. */
static void
lease_finalize(PyObject *op)
{
    Lease *self = (Lease *)op;
    if (self->refcount <= 0 || self->pool == NULL) {
        return;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *saved = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
#endif
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self->pool, str_on_leak, op);
    if (r == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear(); /* interpreter shutdown: nothing left to report to */
        }
        else {
            PyErr_WriteUnraisable(op);
        }
    }
    else {
        Py_DECREF(r);
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(saved);
#else
    PyErr_Restore(type, value, tb);
#endif
}

static void
lease_dealloc(Lease *self)
{
    if (self->refcount > 0 && self->pool != NULL) {
        if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
            return; /* resurrected */
        }
    }
    PyObject_GC_UnTrack(self);
    if (self->weaklist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    lease_clear(self);
    if (Py_TYPE(self) == &LeaseType) {
        lease_free(self);
    }
    else {
        PyObject_GC_Del(self);
    }
}

/* Append ``item`` to ``list``, stealing the reference.  Never runs Python code. */
static int
list_append_steal(PyObject *list, PyObject *item)
{
    PyListObject *l = (PyListObject *)list;
    Py_ssize_t n = Py_SIZE(l);
    if (n < l->allocated) {
        l->ob_item[n] = item;
        Py_SET_SIZE(l, n + 1);
        return 0;
    }
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

PyDoc_STRVAR(lease_release_doc,
"Drop one owner; at zero the slot returns to the pool (or to quarantine while any\n"
"view of it is still alive).  Releasing past zero raises LeaseReleasedError.");

static PyObject *
lease_release(Lease *self, PyObject *Py_UNUSED(ignored))
{
    PoolCore *pool = self->pool;
    if (pool == NULL || pool->lock == NULL || pool->lock->held) {
        goto python;
    }
    Py_ssize_t rc = self->refcount;
    if (rc != 1) {
        if (rc > 1) {
            self->refcount = rc - 1;
            Py_RETURN_NONE;
        }
        return lease_error(self, "%U released more times than retained (refcount %zd)");
    }
    PyObject *buf = self->buf, *view = self->view, *tier_o = self->tier;
    if (pool->slow_release || is_none(tier_o) || !PyObject_TypeCheck(tier_o, &TierCoreType)
        || buf == NULL || !PyByteArray_CheckExact(buf)
        || (!is_none(view) && !PyMemoryView_Check(view))) {
        goto python; /* scrub, waiters or a heap lease: the reference path */
    }
    TierCore *tier = (TierCore *)tier_o;
    if (tier->free == NULL || !PyList_CheckExact(tier->free) || tier->quarantine == NULL
        || !PyList_CheckExact(tier->quarantine)) {
        goto python;
    }
    self->refcount = 0;
    self->buf = NULL; /* its reference is now ours */
    self->view = NULL;
    /* The lease's own view dies here unless someone else holds it.  Freeing a memoryview runs
     * no Python code, except weakref callbacks someone may have put on it: re-check the lock
     * below, and keep the tier alive through them (the callback may drop the pool's tiers). */
    Py_INCREF(tier);
    Py_XDECREF(view);
    int locked = 0;
    if (pool->lock->held) {
        fastlock_take(pool->lock, -1);
        locked = 1;
    }
    tier->in_use--;
    PyObject *dest = Py_REFCNT(buf) == 1 ? tier->free : tier->quarantine;
    int r = list_append_steal(dest, buf);
    if (locked) {
        fastlock_give(pool->lock);
    }
    Py_DECREF(tier);
    if (r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
python:
    return PyObject_CallOneArg(py_release, (PyObject *)self);
}

PyDoc_STRVAR(lease_retain_doc, "Add an owner; each retain needs a matching release.  Returns self.");

static PyObject *
lease_retain(Lease *self, PyObject *Py_UNUSED(ignored))
{
    PoolCore *pool = self->pool;
    if (pool == NULL) { /* cleared by the GC (only reachable from a finalizer) */
        return lease_error(self, "%U: retain() after the lease was released");
    }
    if (pool->lock == NULL || pool->lock->held) {
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)pool, str_retain, (PyObject *)self);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
        return Py_NewRef((PyObject *)self);
    }
    if (self->refcount <= 0) {
        return lease_error(self, "%U: retain() after the lease was released");
    }
    self->refcount++;
    return Py_NewRef((PyObject *)self);
}

/* The lease's memoryview, made on first use: exactly ``size`` bytes of the slot, its ``obj``
 * the slot bytearray (so it is tracked like every other view of the slot). */
static PyObject *
lease_make_view(Lease *self)
{
    PyObject *buf = Py_NewRef(self->buf); /* a concurrent release now sees a live holder */
    PyObject *mv = PyMemoryView_FromObject(buf);
    if (mv == NULL) {
        Py_DECREF(buf);
        return NULL;
    }
    Py_ssize_t size = self->size;
    PyMemoryViewObject *m = (PyMemoryViewObject *)mv;
    if (size != m->view.len) {
        if (PyByteArray_CheckExact(buf) && m->view.ndim == 1 && m->view.itemsize == 1
            && m->view.shape != NULL && size >= 0 && size < m->view.len) {
            /* The same as mv[:size] on a view nobody else has seen yet, without a second
             * memoryview object: shape and length shrink, buffer, strides and flags stay. */
            m->view.len = size;
            m->view.shape[0] = size;
        }
        else {
            PyObject *cut = PySequence_GetSlice(mv, 0, size);
            Py_DECREF(mv);
            if (cut == NULL) {
                Py_DECREF(buf);
                return NULL;
            }
            mv = cut;
        }
    }
    if (self->buf != buf) { /* released by another thread meanwhile */
        Py_DECREF(mv);
        Py_DECREF(buf);
        return lease_error(self, "%U: .view used after the lease was released");
    }
    Py_DECREF(buf);
    if (!is_none(self->view)) { /* made by another thread meanwhile */
        Py_DECREF(mv);
        return Py_NewRef(self->view);
    }
    Py_XSETREF(self->view, Py_NewRef(mv));
    return mv;
}

static PyObject *
lease_get_view(Lease *self, void *closure)
{
    PyObject *view = self->view;
    if (view != NULL && view != Py_None) {
        return Py_NewRef(view);
    }
    if (is_none(self->buf) || view == Py_None) {
        return lease_error(self, "%U: .view used after the lease was released");
    }
    return lease_make_view(self);
}

static Py_ssize_t
lease_length(Lease *self)
{
    return self->size;
}

static PyObject *
lease_get_capacity(Lease *self, void *closure)
{
    if (is_none(self->buf)) {
        return PyLong_FromLong(0);
    }
    Py_ssize_t n = PyObject_Size(self->buf);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

static PyObject *
lease_get_pooled(Lease *self, void *closure)
{
    return PyBool_FromLong(!is_none(self->tier));
}

static PyObject *
lease_get_refcount(Lease *self, void *closure)
{
    return PyLong_FromSsize_t(self->refcount);
}

static PyObject *
lease_get_released(Lease *self, void *closure)
{
    return PyBool_FromLong(self->refcount <= 0);
}

PyDoc_STRVAR(lease_truncate_doc,
"Shrink the visible length to ``size`` bytes (<= len(self)); views taken before keep\n"
"their length.");

static PyObject *
lease_truncate(Lease *self, PyObject *arg)
{
    /* As PyLease.truncate: the size through operator.index, then the released check, then
     * the range (an int beyond Py_ssize_t is out of range, with its own value in the message). */
    PyObject *index = PyNumber_Index(arg);
    if (index == NULL) {
        return NULL;
    }
    if (is_none(self->buf) || self->view == Py_None) {
        Py_DECREF(index);
        return lease_error(self, "%U: .view used after the lease was released");
    }
    Py_ssize_t n = PyLong_AsSsize_t(index);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        n = -1; /* out of range either way; reported with the int itself */
    }
    if (n < 0 || n > self->size) {
        PyErr_Format(PyExc_ValueError, "truncate size must be within 0..%zd, got %S",
                     self->size, index);
        Py_DECREF(index);
        return NULL;
    }
    Py_DECREF(index);
    if (self->view != NULL) {
        PyObject *cut = PySequence_GetSlice(self->view, 0, n);
        if (cut == NULL) {
            return NULL;
        }
        Py_XSETREF(self->view, cut);
    }
    self->size = n;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(lease_copy_from_doc,
"Copy ``data`` (a contiguous bytes-like object of at most ``len(self)`` bytes) to the start\n"
"of the lease's memory without making a view; returns the number of bytes copied.");

static PyObject *
lease_copy_from(Lease *self, PyObject *data)
{
    /* The GIL is held throughout (no Python code runs between the check and the copy), so
     * no release can hand the slot on meanwhile. */
    if (is_none(self->buf) || self->view == Py_None) {
        return lease_error(self, "%U: copy_from() after the lease was released");
    }
    Py_buffer src;
    if (PyObject_GetBuffer(data, &src, PyBUF_FULL_RO) < 0) {
        return NULL;
    }
    if (!PyBuffer_IsContiguous(&src, 'C')) {
        PyErr_SetString(PyExc_BufferError, "copy_from: data must be C-contiguous");
        PyBuffer_Release(&src);
        return NULL;
    }
    if (src.len > self->size) {
        PyErr_Format(PyExc_ValueError,
                     "copy_from: %zd bytes do not fit the lease's %zd bytes", src.len, self->size);
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_buffer dst;
    if (PyObject_GetBuffer(self->buf, &dst, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    memmove(dst.buf, src.buf, (size_t)src.len); /* (data may be a view of this very slot) */
    Py_ssize_t n = src.len;
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(n);
}

PyDoc_STRVAR(lease_tobytes_doc, "Copy of the visible bytes, safe to keep after release.");

static PyObject *
lease_tobytes(Lease *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *view = self->view;
    if (is_none(self->buf) || view == Py_None) {
        return lease_error(self, "%U: .view used after the lease was released");
    }
    if (view != NULL || !PyByteArray_CheckExact(self->buf)
        || self->size > PyByteArray_GET_SIZE(self->buf)) {
        PyObject *v = lease_get_view(self, NULL);
        if (v == NULL) {
            return NULL;
        }
        PyObject *r = PyObject_CallMethodNoArgs(v, str_tobytes);
        Py_DECREF(v);
        return r;
    }
    return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self->buf), self->size);
}

static PyObject *
lease_enter(Lease *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef((PyObject *)self);
}

static PyObject *
lease_exit(Lease *self, PyObject *const *args, Py_ssize_t nargs)
{
    return lease_release(self, NULL);
}

static PyMethodDef lease_methods[] = {
    {"release", (PyCFunction)lease_release, METH_NOARGS, lease_release_doc},
    {"retain", (PyCFunction)lease_retain, METH_NOARGS, lease_retain_doc},
    {"truncate", (PyCFunction)lease_truncate, METH_O, lease_truncate_doc},
    {"tobytes", (PyCFunction)lease_tobytes, METH_NOARGS, lease_tobytes_doc},
    {"copy_from", (PyCFunction)lease_copy_from, METH_O, lease_copy_from_doc},
    {"__enter__", (PyCFunction)lease_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lease_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

/* The lease's internal state, readable (None for an empty field) and never writable: writes
 * used to reach fields the C code trusts (``_size = -1`` made len() raise SystemError).  The
 * pure-Python lease has the same read-only properties, with the same message. */
static PyObject *
field_or_none(PyObject *o)
{
    return Py_NewRef(o == NULL ? Py_None : o);
}

static PyObject *
lease_get_internal(Lease *self, void *closure)
{
    switch ((int)(intptr_t)closure) {
    case 0: return field_or_none((PyObject *)self->pool);
    case 1: return field_or_none(self->tier);
    case 2: return field_or_none(self->buf);
    case 3: return field_or_none(self->view);
    case 4: return field_or_none(self->site);
    case 5: return PyLong_FromSsize_t(self->size);
    default: return PyLong_FromSsize_t(self->refcount);
    }
}

static const char *internal_names[] = {"_pool", "_tier", "_buf", "_view", "_site", "_size",
                                       "_refcount"};

static int
lease_set_internal(Lease *self, PyObject *value, void *closure)
{
    PyErr_Format(PyExc_AttributeError, "Lease.%s is internal state of the pool and read-only",
                 internal_names[(int)(intptr_t)closure]);
    return -1;
}

#define INTERNAL(name, i) \
    {name, (getter)lease_get_internal, (setter)lease_set_internal, NULL, (void *)(intptr_t)(i)}

static PyGetSetDef lease_getset[] = {
    INTERNAL("_pool", 0), INTERNAL("_tier", 1), INTERNAL("_buf", 2), INTERNAL("_view", 3),
    INTERNAL("_site", 4), INTERNAL("_size", 5), INTERNAL("_refcount", 6),
    {"view", (getter)lease_get_view, NULL,
     "Writable memoryview of exactly ``len(self)`` bytes, format \"B\".\n\n"
     "Valid until the last ``release()``; raises LeaseReleasedError after it.", NULL},
    {"capacity", (getter)lease_get_capacity, NULL,
     "Bytes of the backing slot (>= len(self)); 0 once released.", NULL},
    {"pooled", (getter)lease_get_pooled, NULL,
     "True when backed by a pool slot, False for a heap fallback.", NULL},
    {"refcount", (getter)lease_get_refcount, NULL, NULL, NULL},
    {"released", (getter)lease_get_released, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};


static PySequenceMethods lease_as_sequence = {
    .sq_length = (lenfunc)lease_length,
};

PyDoc_STRVAR(lease_doc,
"One slot of pool memory (or a heap buffer when the pool fell back), ``len(lease)``\n"
"bytes visible through ``lease.view``.\n\n"
"Refcounted: ``retain()`` adds an owner, ``release()`` drops one; the slot goes back to the\n"
"pool when the count reaches zero *and* no memoryview of it is alive any more.");

static PyTypeObject LeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bufpool.Lease",
    .tp_basicsize = sizeof(Lease),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = lease_doc,
    .tp_new = lease_new,
    .tp_dealloc = (destructor)lease_dealloc,
    .tp_finalize = lease_finalize,
    .tp_traverse = (traverseproc)lease_traverse,
    .tp_clear = (inquiry)lease_clear,
    .tp_repr = (reprfunc)lease_repr,
    .tp_as_sequence = &lease_as_sequence,
    .tp_methods = lease_methods,
    .tp_getset = lease_getset,
    .tp_weaklistoffset = offsetof(Lease, weaklist),
};

/* ------------------------------------------------------------------ PoolCore.acquire */

PyDoc_STRVAR(pool_acquire_doc,
"acquire(size)\n--\n\n"
"Lease ``size`` bytes from the smallest class whose slot fits.\n\n"
"When that class has no free slot: reclaim quarantine, grow within the budget, then\n"
"follow ``on_exhausted``.  Requests above the largest class are served from the heap\n"
"(counted as ``oversize``) unless the policy is \"raise\" (RequestTooLarge).");

static PyObject *
pool_acquire(PoolCore *self, PyObject *arg)
{
    Py_ssize_t size;
    int huge = 0;
    if (!PyLong_CheckExact(arg)) {
        return PyObject_CallOneArg(bad_size, arg);
    }
    size = PyLong_AsSsize_t(arg);
    if (size < 0) {
        if (size != -1 || !PyErr_Occurred()) {
            return PyObject_CallOneArg(bad_size, arg);
        }
        PyErr_Clear();
        PyObject *zero = PyLong_FromLong(0);
        if (zero == NULL) {
            return NULL;
        }
        int neg = PyObject_RichCompareBool(arg, zero, Py_LT);
        Py_DECREF(zero);
        if (neg) {
            return neg < 0 ? NULL : PyObject_CallOneArg(bad_size, arg);
        }
        huge = 1; /* beyond Py_ssize_t: an oversize request */
    }
    PyObject *site = NULL;
    if (self->sampling) {
        Py_ssize_t left = self->countdown - 1;
        if (left) {
            self->countdown = left;
        }
        else {
            self->countdown = self->interval;
            site = capture_site();
            if (site == NULL) {
                return NULL;
            }
        }
    }
    Lease *lease = NULL;
    if (!huge) {
        lease = lease_alloc(); /* may run the cyclic GC: before the checks */
        if (lease == NULL) {
            Py_XDECREF(site);
            return NULL;
        }
        lease->weaklist = NULL;
    }
    /* ---- from here to the return: no Python code runs ---- */
    Py_ssize_t i = 0, n = self->ntiers;
    if (!huge) {
        const Py_ssize_t *sizes = self->slot_sizes;
        while (i < n && size > sizes[i]) {
            i++;
        }
    }
    if (huge || i == n) {
        if (lease != NULL) {
            lease_free(lease);
        }
        PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self, str_oversize_lease, arg,
                                                 site ? site : Py_None, NULL);
        Py_XDECREF(site);
        return r;
    }
    TierCore *tier = (TierCore *)PyTuple_GET_ITEM(self->tiers, i);
    PyObject *free = tier->free;
    Py_ssize_t nfree;
    if (self->lock == NULL || self->lock->held || free == NULL || !PyList_CheckExact(free)
        || (nfree = PyList_GET_SIZE(free)) == 0) {
        lease_free(lease);
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL) {
            Py_XDECREF(site);
            return NULL;
        }
        PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self, str_acquire_slow, index, arg,
                                                 site ? site : Py_None, NULL);
        Py_DECREF(index);
        Py_XDECREF(site);
        return r;
    }
    nfree--;
    PyObject *buf = PyList_GET_ITEM(free, nfree); /* the list's reference becomes the lease's */
    Py_SET_SIZE(free, nfree);
    tier->hits++;
    Py_ssize_t using = ++tier->in_use;
    if (using > tier->high_water) {
        tier->high_water = using;
    }
    tier->requested_bytes += size;
    lease->pool = (PoolCore *)Py_NewRef((PyObject *)self);
    lease->tier = Py_NewRef((PyObject *)tier);
    lease->buf = buf;
    lease->view = NULL;
    lease->site = site;
    lease->size = size;
    lease->refcount = 1;
    PyObject_GC_Track(lease);
    return (PyObject *)lease;
}

static PyMethodDef pool_methods[] = {
    {"acquire", (PyCFunction)pool_acquire, METH_O, pool_acquire_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"_tiers", (getter)pool_get_tiers, (setter)pool_set_tiers, NULL, NULL},
    {"_lock", (getter)pool_get_lock, (setter)pool_set_lock, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef pool_members[] = {
    {"_slow_release", T_BOOL, offsetof(PoolCore, slow_release), 0, NULL},
    {"_sampling", T_BOOL, offsetof(PoolCore, sampling), 0, NULL},
    {"_countdown", T_PYSSIZET, offsetof(PoolCore, countdown), 0, NULL},
    {"_interval", T_PYSSIZET, offsetof(PoolCore, interval), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject PoolCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bufpool._speedups.PoolCore",
    .tp_basicsize = sizeof(PoolCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Base of BufferPool: the compiled acquire and the fields the hot paths read.",
    .tp_new = pool_new,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_traverse = (traverseproc)pool_traverse,
    .tp_clear = (inquiry)pool_clear,
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
    .tp_members = pool_members,
};

/* ------------------------------------------------------------------ module */

/* ------------------------------------------------------------------ lease state (locked) */

/* What the pure-Python locked sections (bufpool._lease.release_locked, the pool's retain, leak
 * drain, slow acquire) do to a lease: the only ways to change its state from Python, each
 * refused unless the caller holds the pool's lock. */

static PyObject *
mod_new_lease(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "new_lease(pool, tier, buf, size, site)");
        return NULL;
    }
    PyObject *pool = args[0], *tier = args[1], *buf = args[2], *site = args[4];
    if (!PyObject_TypeCheck(pool, &PoolCoreType)) {
        PyErr_SetString(PyExc_TypeError, "new_lease: pool must be a BufferPool");
        return NULL;
    }
    if (tier != Py_None && !PyObject_TypeCheck(tier, &TierCoreType)) {
        PyErr_SetString(PyExc_TypeError, "new_lease: tier must be a Tier or None");
        return NULL;
    }
    if (!PyByteArray_CheckExact(buf)) {
        PyErr_SetString(PyExc_TypeError, "new_lease: buf must be a bytearray");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[3]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0 || size > PyByteArray_GET_SIZE(buf)) {
        PyErr_SetString(PyExc_ValueError, "new_lease: size must be within 0..len(buf)");
        return NULL;
    }
    if (!holds_pool_lock((PoolCore *)pool, "new_lease")) {
        return NULL;
    }
    Lease *self = lease_alloc();
    if (self == NULL) {
        return NULL;
    }
    self->weaklist = NULL;
    self->pool = (PoolCore *)Py_NewRef(pool);
    self->tier = Py_NewRef(tier);
    self->buf = Py_NewRef(buf);
    self->view = NULL;
    self->site = Py_NewRef(site);
    self->size = size;
    self->refcount = 1;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static Lease *
locked_lease(PyObject *o, const char *what)
{
    if (!PyObject_TypeCheck(o, &LeaseType)) {
        PyErr_Format(PyExc_TypeError, "%s: a bufpool.Lease is required", what);
        return NULL;
    }
    Lease *self = (Lease *)o;
    return holds_pool_lock(self->pool, what) ? self : NULL;
}

static PyObject *
mod_lease_set_refcount(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_refcount(lease, n)");
        return NULL;
    }
    Lease *self = locked_lease(args[0], "set_refcount");
    if (self == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n < 1 || self->refcount < 1) { /* only ever between two live counts */
        PyErr_SetString(PyExc_ValueError, "set_refcount: a live lease's count stays >= 1");
        return NULL;
    }
    self->refcount = n;
    Py_RETURN_NONE;
}

static PyObject *
mod_lease_detach(PyObject *module, PyObject *lease)
{
    Lease *self = locked_lease(lease, "detach");
    if (self == NULL) {
        return NULL;
    }
    PyObject *buf = self->buf, *view = self->view;
    self->refcount = 0;
    self->buf = NULL;
    self->view = NULL;
    Py_XDECREF(view); /* the lease's own view dies here unless someone else holds it */
    return buf == NULL ? Py_NewRef(Py_None) : buf; /* the lease's reference becomes ours */
}

static PyObject *
mod_setup(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"released_error", "py_release", "bad_size", "pkg_dir",
                             "site_depth", NULL};
    PyObject *err, *rel, *bad, *dir;
    Py_ssize_t depth;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOUn:setup", kwlist, &err, &rel, &bad,
                                     &dir, &depth)) {
        return NULL;
    }
    if (depth < 0 || depth > MAX_SITE_DEPTH) {
        PyErr_Format(PyExc_ValueError, "site_depth must be within 0..%d", MAX_SITE_DEPTH);
        return NULL;
    }
    Py_XSETREF(LeaseReleasedError, Py_NewRef(err));
    Py_XSETREF(py_release, Py_NewRef(rel));
    Py_XSETREF(bad_size, Py_NewRef(bad));
    Py_XSETREF(pkg_dir, Py_NewRef(dir));
    site_depth = depth;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"new_lease", (PyCFunction)(void (*)(void))mod_new_lease, METH_FASTCALL,
     "new_lease(pool, tier, buf, size, site): a lease of ``buf`` (pool lock held)."},
    {"set_refcount", (PyCFunction)(void (*)(void))mod_lease_set_refcount, METH_FASTCALL,
     "set_refcount(lease, n): a live lease's owner count (pool lock held)."},
    {"detach", (PyCFunction)mod_lease_detach, METH_O,
     "detach(lease) -> slot: the lease's last release (pool lock held): count 0, its slot "
     "handed to the caller, its view dropped."},
    {"setup", (PyCFunction)(void (*)(void))mod_setup, METH_VARARGS | METH_KEYWORDS,
     "Hand the module the pure-Python pieces it falls back to (called by bufpool._pool)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bufpool._speedups",
    .m_doc = "Compiled hot paths of bufpool's memory core; see bufpool._impl.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&FastLockType) < 0 || PyType_Ready(&TierCoreType) < 0
        || PyType_Ready(&PoolCoreType) < 0 || PyType_Ready(&LeaseType) < 0) {
        return NULL;
    }
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(str_acquire_slow, "_acquire_slow");
    INTERN(str_oversize_lease, "_oversize_lease");
    INTERN(str_retain, "_retain");
    INTERN(str_on_leak, "_on_leak");
    INTERN(str_tobytes, "tobytes");
#undef INTERN
    LeaseReleasedError = Py_NewRef(PyExc_RuntimeError); /* until setup() */
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "FastLock", (PyObject *)&FastLockType) < 0
        || PyModule_AddObjectRef(m, "TierCore", (PyObject *)&TierCoreType) < 0
        || PyModule_AddObjectRef(m, "PoolCore", (PyObject *)&PoolCoreType) < 0
        || PyModule_AddObjectRef(m, "Lease", (PyObject *)&LeaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
