/* bufpool.tls._cscan: the TLS record splitter's hot path in C (CPython C API, no build
 * dependency).
 *
 * What it holds
 *   TLSRecord      the record type handed out by TLSRecordSplitter when this module is built
 *       (bufpool.tls.TLSRecord is then this type, for both splitters).  A record stores
 *       where it lies (a memoryview ``base`` and [start, stop) within it) and makes its
 *       ``raw`` and ``payload`` views only when first read: a view on base's managed buffer
 *       narrowed the way slicing narrows it, so releases, exports and derived views behave as
 *       for ``base[start:stop]``.  A record nobody reads costs no view at all.
 *   init(content_types, detach, repr)   once, at import of bufpool.tls._records: the
 *       256-entry int -> ContentType table and the two Python helpers the type's
 *       ``detach()`` and ``repr()`` call (shared with the pure-Python TLSRecord).
 *   make(ct, version, offset, base, start, stop, pool, lease) -> TLSRecord
 *       one record, for the Python paths (the reference scan, joined records).
 *   scan(mv, pos, end, base, out, limit, pool) -> int
 *       hands out, appended to ``out``, every complete record of ``mv[pos:end]`` whose header
 *       passes the splitter's fast check (content type 20..24, version major 3, length <=
 *       ``limit``, no empty non-application_data record); returns where it stopped: ``pos``
 *       at the end of the input or at an incomplete record whose header passed, ``-pos - 1``
 *       where the pure-Python reference (TLSRecordSplitter._scan_py) must continue: fewer
 *       than 5 bytes left, a header that fails the check, or input it does not expect.  So
 *       every error, message and partial-header judgement is made by the same Python code.
 *   release(records, check) -> int
 *       the expiry of a call's records: each record goes stale (its views can no longer be
 *       made) and the views it made are released; a BufferError (a view still exported)
 *       counts 1 when ``check`` is true and the record has no lease.
 *
 * Worst case: O(1) per record (a 5-byte header read, one small object); nothing per payload
 * byte; one memoryview per view actually read.  Anything unusual (a non-memoryview, a
 * non-contiguous or released buffer, positions out of range) is left untouched for the
 * Python path, which raises what it raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(Py_GIL_DISABLED)
#error "bufpool.tls._cscan relies on the GIL; free-threaded builds use the pure-Python splitter"
#endif

static PyObject *content_types = NULL;     /* tuple of 256: ContentType or None */
static PyObject *versions[256];            /* ints 0x0300..0x03ff (what scan() accepts) */
static PyObject *release_method = NULL;    /* memoryview.release */
static PyObject *detach_func = NULL;       /* _records._detach(record, pool) */
static PyObject *repr_func = NULL;         /* _records._record_repr(record) */
static PyObject *empty_bytes = NULL;

typedef struct {
    PyObject_HEAD
    PyObject *base;      /* memoryview the views are cut from; NULL once stale */
    PyObject *raw;       /* header + payload view, NULL until read */
    PyObject *payload;   /* payload view, NULL until read */
    PyObject *pool;      /* BufferPool or None */
    PyObject *lease;     /* Lease of a joined record, or None */
    Py_ssize_t start;    /* the record is base[start:stop] */
    Py_ssize_t stop;
    Py_ssize_t offset;   /* stream offset of the header */
    int ct;
    int version;
    int stale;           /* expired: no more views are made */
} RecordObject;

static PyTypeObject Record_Type;

static const char RELEASED[] = "operation forbidden on released memoryview object";

/* base[a:b] without a slice object: a new view on base's managed buffer (what slicing
 * registers), narrowed the way memoryview's slicing narrows a 1-D contiguous byte view
 * (buf, len, shape; strides, format and flags stay).  base was checked to be one. */
static PyObject *
cut(PyObject *base, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *v = PyMemoryView_FromObject(base);  /* ValueError if base was released */
    if (v == NULL) {
        return NULL;
    }
    Py_buffer *rv = &((PyMemoryViewObject *)v)->view;
    if (b > rv->len) {  /* cannot happen for a checked base; never read out of bounds */
        Py_DECREF(v);
        PyErr_SetString(PyExc_SystemError, "TLSRecord outside its buffer");
        return NULL;
    }
    rv->buf = (char *)rv->buf + a;
    rv->len = b - a;
    rv->shape[0] = b - a;
    return v;
}

static int
is_released(PyObject *view)
{
    return (((PyMemoryViewObject *)view)->flags & _Py_MEMORYVIEW_RELEASED) != 0;
}

/* A usable 1-D contiguous unsigned-byte memoryview (what the splitter slices records from). */
static int
byte_view_ok(PyObject *mv, Py_buffer *probe)
{
    if (!PyMemoryView_Check(mv)) {
        return 0;
    }
    if (PyObject_GetBuffer(mv, probe, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    const Py_buffer *mine = PyMemoryView_GET_BUFFER(mv);
    if (mine->ndim != 1 || mine->itemsize != 1 || mine->shape == NULL || mine->strides == NULL
        || mine->strides[0] != 1 || mine->suboffsets != NULL || mine->buf != probe->buf
        || (mine->format != NULL && strcmp(mine->format, "B") != 0)) {
        PyBuffer_Release(probe);
        return 0;
    }
    return 1;
}

static RecordObject *
record_alloc(void)
{
    RecordObject *r = PyObject_New(RecordObject, &Record_Type);
    if (r != NULL) {
        r->base = r->raw = r->payload = r->pool = r->lease = NULL;
        r->stale = 0;
    }
    return r;
}

static void
record_dealloc(RecordObject *r)
{
    PyObject *base = r->base, *raw = r->raw, *payload = r->payload, *pool = r->pool,
             *lease = r->lease;
    Py_XDECREF(payload);
    Py_XDECREF(raw);
    Py_XDECREF(base);
    Py_XDECREF(lease);
    Py_XDECREF(pool);
    PyObject_Free(r);
}

/* A new, already released memoryview: what a stale record's never-read ``raw`` returns
 * (the pure-Python record returns its released view). */
static PyObject *
released_view(void)
{
    PyObject *v = PyMemoryView_FromObject(empty_bytes);
    if (v == NULL) {
        return NULL;
    }
    PyObject *r = PyObject_Vectorcall(release_method, &v, 1, NULL);
    if (r == NULL) {
        Py_DECREF(v);
        return NULL;
    }
    Py_DECREF(r);
    return v;
}

static PyObject *
record_get_raw(RecordObject *r, void *closure)
{
    if (r->raw == NULL) {
        if (r->stale) {
            return released_view();
        }
        r->raw = cut(r->base, r->start, r->stop);
        if (r->raw == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(r->raw);
}

static PyObject *
record_get_payload(RecordObject *r, void *closure)
{
    if (r->payload == NULL) {
        /* the pure-Python record slices raw: a released raw refuses */
        if (r->stale || (r->raw != NULL && is_released(r->raw))) {
            PyErr_SetString(PyExc_ValueError, RELEASED);
            return NULL;
        }
        r->payload = cut(r->base, r->start + 5, r->stop);
        if (r->payload == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(r->payload);
}

static PyObject *
record_get_private_payload(RecordObject *r, void *closure)
{
    return Py_NewRef(r->payload != NULL ? r->payload : Py_None);
}

static PyObject *
record_get_length(RecordObject *r, void *closure)
{
    if (r->stale || (r->raw != NULL && is_released(r->raw))) {
        PyErr_SetString(PyExc_ValueError, RELEASED);
        return NULL;
    }
    return PyLong_FromSsize_t(r->stop - r->start - 5);
}

static PyObject *
record_get_content_type(RecordObject *r, void *closure)
{
    return Py_NewRef(PyTuple_GET_ITEM(content_types, r->ct));
}

static PyObject *
record_get_version(RecordObject *r, void *closure)
{
    if ((r->version >> 8) == 3) {
        return Py_NewRef(versions[r->version & 0xff]);
    }
    return PyLong_FromLong(r->version);
}

static PyObject *
record_get_offset(RecordObject *r, void *closure)
{
    return PyLong_FromSsize_t(r->offset);
}

static PyObject *
record_get_pool(RecordObject *r, void *closure)
{
    return Py_NewRef(r->pool);
}

static PyObject *
record_get_lease(RecordObject *r, void *closure)
{
    return Py_NewRef(r->lease);
}

static PyObject *
record_detach(RecordObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"pool", NULL};
    PyObject *pool = Py_None;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs + nkw > 1) {
        PyErr_SetString(PyExc_TypeError, "detach() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1) {
        pool = args[0];
    }
    else if (nkw == 1) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0))
            || PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), names[0]) != 0) {
            PyErr_Format(PyExc_TypeError, "detach() got an unexpected keyword argument %R",
                         PyTuple_GET_ITEM(kwnames, 0));
            return NULL;
        }
        pool = args[0];
    }
    PyObject *call[2] = {(PyObject *)r, pool};
    return PyObject_Vectorcall(detach_func, call, 2, NULL);
}

static PyObject *
record_repr(RecordObject *r)
{
    PyObject *arg = (PyObject *)r;
    return PyObject_Vectorcall(repr_func, &arg, 1, NULL);
}

static PyGetSetDef record_getset[] = {
    {"raw", (getter)record_get_raw, NULL,
     "Header + payload (memoryview), made on first read; valid until the next call of the "
     "splitter that produced the record.", NULL},
    {"payload", (getter)record_get_payload, NULL,
     "The record body (memoryview of the bytes after the header); same lifetime as raw.",
     NULL},
    {"length", (getter)record_get_length, NULL, "Payload length in bytes.", NULL},
    {"content_type", (getter)record_get_content_type, NULL, "ContentType.", NULL},
    {"version", (getter)record_get_version, NULL, "Legacy record version, e.g. 0x0303.", NULL},
    {"offset", (getter)record_get_offset, NULL, "Stream offset of the header, bytes.", NULL},
    {"_payload", (getter)record_get_private_payload, NULL, NULL, NULL},
    {"_pool", (getter)record_get_pool, NULL, NULL, NULL},
    {"_lease", (getter)record_get_lease, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef record_methods[] = {
    {"detach", (PyCFunction)(void (*)(void))record_detach, METH_FASTCALL | METH_KEYWORDS,
     "detach(pool=None) -> DetachedRecord: copy the record into a pooled lease that stays "
     "valid until you release it."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Record_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bufpool.tls.TLSRecord",
    .tp_basicsize = sizeof(RecordObject),
    .tp_dealloc = (destructor)record_dealloc,
    .tp_repr = (reprfunc)record_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One complete record, as handed out by TLSRecordSplitter (compiled type).\n\n"
              "content_type, version, offset (stream offset of the header), raw (header + "
              "payload) and payload (memoryviews, made on first read).  Lifetime: the views "
              "are valid until the next feed()/get_buffer()/pull() of the splitter that "
              "produced the record; then they are released (using them raises ValueError). "
              "Keep a record longer with detach().",
    .tp_getset = record_getset,
    .tp_methods = record_methods,
};

static PyObject *
cscan_init(PyObject *module, PyObject *args)
{
    PyObject *cts, *detach, *repr;
    if (!PyArg_ParseTuple(args, "O!OO:init", &PyTuple_Type, &cts, &detach, &repr)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(cts) != 256) {
        PyErr_SetString(PyExc_ValueError, "content_types must have 256 entries");
        return NULL;
    }
    for (int ct = 20; ct <= 24; ct++) {
        if (PyTuple_GET_ITEM(cts, ct) == Py_None) {
            PyErr_SetString(PyExc_ValueError, "content_types[20..24] must be set");
            return NULL;
        }
    }
    if (!PyCallable_Check(detach) || !PyCallable_Check(repr)) {
        PyErr_SetString(PyExc_TypeError, "init() needs callables for detach and repr");
        return NULL;
    }
    Py_INCREF(cts);
    Py_XSETREF(content_types, cts);
    Py_INCREF(detach);
    Py_XSETREF(detach_func, detach);
    Py_INCREF(repr);
    Py_XSETREF(repr_func, repr);
    Py_RETURN_NONE;
}

static int
ready(void)
{
    if (content_types == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bufpool.tls._cscan.init() was not called");
        return 0;
    }
    return 1;
}

static PyObject *
cscan_make(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "make() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!ready()) {
        return NULL;
    }
    long ct = PyLong_AsLong(args[0]);
    long version = PyLong_AsLong(args[1]);
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    Py_ssize_t start = PyLong_AsSsize_t(args[4]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *base = args[3];
    if (ct < 0 || ct > 255 || PyTuple_GET_ITEM(content_types, ct) == Py_None || version < 0
        || version > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "make(): bad content type or version");
        return NULL;
    }
    Py_buffer probe;
    if (!byte_view_ok(base, &probe)) {
        PyErr_SetString(PyExc_TypeError, "make() needs a 1-D contiguous byte memoryview");
        return NULL;
    }
    Py_ssize_t len = probe.len;
    PyBuffer_Release(&probe);
    if (start < 0 || stop > len || stop - start < 5) {
        PyErr_SetString(PyExc_ValueError, "make(): record bounds outside the buffer");
        return NULL;
    }
    RecordObject *r = record_alloc();
    if (r == NULL) {
        return NULL;
    }
    r->base = Py_NewRef(base);
    r->pool = Py_NewRef(args[6]);
    r->lease = Py_NewRef(args[7]);
    r->start = start;
    r->stop = stop;
    r->offset = offset;
    r->ct = (int)ct;
    r->version = (int)version;
    return (PyObject *)r;
}

static PyObject *
cscan_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "scan() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!ready()) {
        return NULL;
    }
    PyObject *mv = args[0], *out = args[4], *pool = args[6];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t base = PyLong_AsSsize_t(args[3]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[5]);
    if ((pos == -1 || end == -1 || base == -1 || limit == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_CheckExact(out)) {
        PyErr_SetString(PyExc_TypeError, "scan() needs a list for out");
        return NULL;
    }
    if (pos < 0) {
        PyErr_SetString(PyExc_ValueError, "scan(): negative position");
        return NULL;
    }
    Py_buffer view;
    if (!byte_view_ok(mv, &view)) {  /* the Python path says what is wrong */
        return PyLong_FromSsize_t(-pos - 1);
    }
    if (pos < 0 || end > view.len || pos > end) {
        PyBuffer_Release(&view);
        return PyLong_FromSsize_t(-pos - 1);
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    PyObject *result = NULL;
    int judged = 1;  /* stopped where nothing needs the Python path's judgement */
    while (pos < end) {
        const unsigned char *h = buf + pos;
        unsigned int ct = h[0];
        if (end - pos < 5) {
            judged = 0;  /* a partial header: the Python path judges its bytes */
            break;
        }
        Py_ssize_t ln = ((Py_ssize_t)h[3] << 8) | h[4];
        if (ln > limit || h[1] != 3 || ct < 20 || ct > 24 || (ln == 0 && ct != 23)) {
            judged = 0;  /* a bad header: the Python path raises */
            break;
        }
        Py_ssize_t stop = pos + 5 + ln;
        if (stop > end) {
            break;  /* incomplete record, header good */
        }
        RecordObject *r = record_alloc();
        if (r == NULL) {
            goto done;
        }
        r->base = Py_NewRef(mv);
        r->pool = Py_NewRef(pool);
        r->lease = Py_NewRef(Py_None);
        r->start = pos;
        r->stop = stop;
        r->offset = base + pos;
        r->ct = (int)ct;
        r->version = 0x0300 | h[2];
        int rc = PyList_Append(out, (PyObject *)r);
        Py_DECREF(r);
        if (rc < 0) {
            goto done;
        }
        pos = stop;
    }
    result = PyLong_FromSsize_t(judged ? pos : -pos - 1);
done:
    PyBuffer_Release(&view);
    return result;
}

/* 1 if releasing ``v`` failed with BufferError (still exported), 0 if released, -1 on any
 * other error. */
static int
release_view(PyObject *v)
{
    PyObject *r = PyObject_Vectorcall(release_method, &v, 1, NULL);
    if (r != NULL) {
        Py_DECREF(r);
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        return 1;
    }
    return -1;
}

static PyObject *
cscan_release(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "release() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *records = args[0];
    int check = PyObject_IsTrue(args[1]);
    if (check < 0) {
        return NULL;
    }
    if (!PyList_CheckExact(records)) {
        PyErr_SetString(PyExc_TypeError, "release() needs a list of records");
        return NULL;
    }
    Py_ssize_t held = 0;
    Py_INCREF(records);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
        RecordObject *r = (RecordObject *)PyList_GET_ITEM(records, i);
        if (Py_TYPE(r) != &Record_Type) {
            PyErr_SetString(PyExc_TypeError, "release() needs TLSRecord objects");
            goto fail;
        }
        Py_INCREF(r);
        r->stale = 1;
        int counts = check && r->lease == Py_None;
        PyObject *views[2] = {r->raw, r->payload};
        Py_XINCREF(views[0]);
        Py_XINCREF(views[1]);
        int failed = 0;
        for (int k = 0; k < 2; k++) {
            if (views[k] != NULL && !failed) {
                int rc = release_view(views[k]);
                if (rc < 0) {
                    failed = 1;
                }
                else {
                    held += rc && counts;
                }
            }
        }
        Py_XDECREF(views[0]);
        Py_XDECREF(views[1]);
        Py_CLEAR(r->base);  /* a stale record keeps neither the input nor a ring view alive */
        Py_DECREF(r);
        if (failed) {
            goto fail;
        }
    }
    Py_DECREF(records);
    return PyLong_FromSsize_t(held);
fail:
    Py_DECREF(records);
    return NULL;
}

static PyMethodDef cscan_methods[] = {
    {"init", (PyCFunction)cscan_init, METH_VARARGS,
     "init(content_types, detach, repr): the int -> ContentType table and the Python helpers "
     "behind TLSRecord.detach() and repr()."},
    {"make", (PyCFunction)(void (*)(void))cscan_make, METH_FASTCALL,
     "make(ct, version, offset, base, start, stop, pool, lease) -> TLSRecord: the record "
     "base[start:stop]."},
    {"scan", (PyCFunction)(void (*)(void))cscan_scan, METH_FASTCALL,
     "scan(mv, pos, end, base, out, limit, pool) -> int: hand out the complete records with "
     "good headers in mv[pos:end]; return where the Python path takes over."},
    {"release", (PyCFunction)(void (*)(void))cscan_release, METH_FASTCALL,
     "release(records, check) -> int: expire the records; count refused view releases."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cscan_module = {
    PyModuleDef_HEAD_INIT,
    "bufpool.tls._cscan",
    "The TLS record splitter's hot path in C (see bufpool.tls._splitter).",
    -1,
    cscan_methods,
};

PyMODINIT_FUNC
PyInit__cscan(void)
{
    if (PyType_Ready(&Record_Type) < 0) {
        return NULL;
    }
    if (versions[0] == NULL) {
        for (int i = 0; i < 256; i++) {
            versions[i] = PyLong_FromLong(0x0300 + i);
            if (versions[i] == NULL) {
                return NULL;
            }
        }
    }
    if (release_method == NULL) {
        release_method = PyObject_GetAttrString((PyObject *)&PyMemoryView_Type, "release");
        if (release_method == NULL) {
            return NULL;
        }
    }
    if (empty_bytes == NULL) {
        empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
        if (empty_bytes == NULL) {
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&cscan_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "TLSRecord", (PyObject *)&Record_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
