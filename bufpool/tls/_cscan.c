/* bufpool.tls._cscan: the TLS record splitter's hot path in C (CPython C API, no build
 * dependency).
 *
 * What it holds
 *   init(record_type, content_types)   once, at import of bufpool.tls._splitter: the
 *       TLSRecord class (a Python class with __slots__; its slot offsets are read from its
 *       member descriptors) and the 256-entry int -> ContentType table.
 *   scan(mv, pos, end, base, out, limit, pool) -> int
 *       hands out, appended to ``out``, every complete record of ``mv[pos:end]`` whose header
 *       passes the splitter's fast check (content type 20..24, version major 3, length <=
 *       ``limit``, no empty non-application_data record), as TLSRecord objects whose ``raw``
 *       is ``mv[start:stop]`` (a view on mv's managed buffer, as slicing makes: releases,
 *       exports and derived views behave the same); returns where it stopped: fewer than 5 bytes left, a header
 *       that fails the check, or an incomplete record.  The pure-Python reference
 *       (TLSRecordSplitter._scan_py) then continues from there, so every error, message and
 *       partial-header judgement is made by the same Python code on both implementations.
 *   release(records, check) -> int
 *       TLSRecordSplitter's expiry loop: release each record's ``raw`` and ``_payload``;
 *       a BufferError (the view is still exported) counts 1 when ``check`` is true and the
 *       record has no lease, like the Python loop (_release_py).
 *
 * Worst case: O(1) per record (a 5-byte header read, one record object, one memoryview,
 * one int); nothing per payload byte.  Anything unusual (a non-memoryview, a non-contiguous or
 * released buffer, positions out of range) is left untouched for the Python path, which
 * raises what it raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <string.h>

#if defined(Py_GIL_DISABLED)
#error "bufpool.tls._cscan relies on the GIL; free-threaded builds use the pure-Python splitter"
#endif

static PyTypeObject *record_type = NULL;   /* TLSRecord */
static PyObject *content_types = NULL;     /* tuple of 256: ContentType or None */
static PyObject *versions[256];            /* ints 0x0300..0x03ff (the only versions scanned) */
static PyObject *release_method = NULL;    /* memoryview.release */
static Py_ssize_t off_content_type, off_version, off_offset, off_raw, off_payload, off_pool,
    off_lease;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static int
slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *out)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);  /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY) || m->offset <= 0) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", type->tp_name,
                     name);
        return -1;
    }
    *out = m->offset;
    return 0;
}

static PyObject *
cscan_init(PyObject *module, PyObject *args)
{
    PyObject *type, *cts;
    if (!PyArg_ParseTuple(args, "O!O!:init", &PyType_Type, &type, &PyTuple_Type, &cts)) {
        return NULL;
    }
    PyTypeObject *t = (PyTypeObject *)type;
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
    if (t->tp_dictoffset != 0 || t->tp_itemsize != 0 || !(t->tp_flags & Py_TPFLAGS_HAVE_GC)) {
        PyErr_Format(PyExc_TypeError, "%s must be a __slots__ class without __dict__",
                     t->tp_name);
        return NULL;
    }
    if (slot_offset(t, "content_type", &off_content_type) < 0
        || slot_offset(t, "version", &off_version) < 0
        || slot_offset(t, "offset", &off_offset) < 0
        || slot_offset(t, "raw", &off_raw) < 0
        || slot_offset(t, "_payload", &off_payload) < 0
        || slot_offset(t, "_pool", &off_pool) < 0
        || slot_offset(t, "_lease", &off_lease) < 0) {
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
    Py_INCREF(type);
    Py_XSETREF(record_type, t);
    Py_INCREF(cts);
    Py_XSETREF(content_types, cts);
    Py_RETURN_NONE;
}

static PyObject *
cscan_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "scan() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bufpool.tls._cscan.init() was not called");
        return NULL;
    }
    PyObject *mv = args[0], *pos_obj = args[1], *out = args[4], *pool = args[6];
    Py_ssize_t pos = PyLong_AsSsize_t(pos_obj);
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
    if (!PyMemoryView_Check(mv) || end - pos < 5) {
        return Py_NewRef(pos_obj);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();  /* released / not contiguous: the Python path says what is wrong */
        return Py_NewRef(pos_obj);
    }
    const Py_buffer *mine = PyMemoryView_GET_BUFFER(mv);
    if (pos < 0 || end > view.len || pos > end || mine->ndim != 1 || mine->itemsize != 1
        || mine->shape == NULL || mine->strides == NULL || mine->strides[0] != 1
        || mine->suboffsets != NULL || mine->buf != view.buf
        || (mine->format != NULL && strcmp(mine->format, "B") != 0)) {
        PyBuffer_Release(&view);
        return Py_NewRef(pos_obj);
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    PyObject *result = NULL;
    while (end - pos >= 5) {
        const unsigned char *h = buf + pos;
        unsigned int ct = h[0];
        Py_ssize_t ln = ((Py_ssize_t)h[3] << 8) | h[4];
        if (ln > limit || h[1] != 3 || ct < 20 || ct > 24 || (ln == 0 && ct != 23)) {
            break;
        }
        Py_ssize_t stop = pos + 5 + ln;
        if (stop > end) {
            break;
        }
        /* mv[pos:stop] without a slice object: a new view on mv's managed buffer (exactly
         * what slicing registers), narrowed the way memoryview's own slicing narrows a 1-D
         * contiguous byte view (buf, len, shape; strides, format and flags stay). */
        PyObject *raw = PyMemoryView_FromObject(mv);
        if (raw == NULL) {
            goto done;
        }
        Py_buffer *rv = &((PyMemoryViewObject *)raw)->view;
        rv->buf = (char *)rv->buf + pos;
        rv->len = stop - pos;
        rv->shape[0] = stop - pos;
        PyObject *offset = PyLong_FromSsize_t(base + pos);
        if (offset == NULL) {
            Py_DECREF(raw);
            goto done;
        }
        PyObject *rec = record_type->tp_alloc(record_type, 0);
        if (rec == NULL) {
            Py_DECREF(offset);
            Py_DECREF(raw);
            goto done;
        }
        SLOT(rec, off_content_type) = Py_NewRef(PyTuple_GET_ITEM(content_types, ct));
        SLOT(rec, off_version) = Py_NewRef(versions[h[2]]);
        SLOT(rec, off_offset) = offset;
        SLOT(rec, off_raw) = raw;
        SLOT(rec, off_payload) = Py_NewRef(Py_None);
        SLOT(rec, off_pool) = Py_NewRef(pool);
        SLOT(rec, off_lease) = Py_NewRef(Py_None);
        int rc = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (rc < 0) {
            goto done;
        }
        pos = stop;
    }
    result = PyLong_FromSsize_t(pos);
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
    if (record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bufpool.tls._cscan.init() was not called");
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
        PyObject *rec = Py_NewRef(PyList_GET_ITEM(records, i));
        if (Py_TYPE(rec) != record_type) {
            Py_DECREF(rec);
            PyErr_SetString(PyExc_TypeError, "release() needs TLSRecord objects");
            goto fail;
        }
        PyObject *raw = SLOT(rec, off_raw);
        PyObject *payload = SLOT(rec, off_payload);
        PyObject *lease = SLOT(rec, off_lease);
        if (raw == NULL) {
            Py_DECREF(rec);
            PyErr_SetString(PyExc_AttributeError, "'TLSRecord' object has no attribute 'raw'");
            goto fail;
        }
        int counts = check && lease == Py_None;
        Py_INCREF(raw);
        int rc = release_view(raw);
        Py_DECREF(raw);
        if (rc < 0) {
            Py_DECREF(rec);
            goto fail;
        }
        held += rc && counts;
        payload = SLOT(rec, off_payload);  /* re-read: the release may have run code */
        if (payload != NULL && payload != Py_None) {
            Py_INCREF(payload);
            rc = release_view(payload);
            Py_DECREF(payload);
            if (rc < 0) {
                Py_DECREF(rec);
                goto fail;
            }
            held += rc && counts;
        }
        Py_DECREF(rec);
    }
    Py_DECREF(records);
    return PyLong_FromSsize_t(held);
fail:
    Py_DECREF(records);
    return NULL;
}

static PyMethodDef cscan_methods[] = {
    {"init", (PyCFunction)cscan_init, METH_VARARGS,
     "init(record_type, content_types): the TLSRecord class and the int -> ContentType table."},
    {"scan", (PyCFunction)(void (*)(void))cscan_scan, METH_FASTCALL,
     "scan(mv, pos, end, base, out, limit, pool) -> int: hand out the complete records with "
     "good headers in mv[pos:end]; return where the Python path takes over."},
    {"release", (PyCFunction)(void (*)(void))cscan_release, METH_FASTCALL,
     "release(records, check) -> int: release the records' views; count refused releases."},
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
    return PyModule_Create(&cscan_module);
}
