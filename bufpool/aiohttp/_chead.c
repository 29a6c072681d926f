/* bufpool.aiohttp._chead: the zero-copy receive path's head scan in C (CPython C API, no
 * build dependency).
 *
 * What it holds
 *   scan_head(buf, nbytes, /) -> int
 *       the compiled twin of bufpool.aiohttp._headscan.scan_head_py (read its docstring for
 *       the contract): the index just after the first CRLF CRLF of buf[:nbytes] when the
 *       head has no bare LF and, if bytes follow it, its first Content-Length line (name
 *       matched case-insensitively at a line start) holds 1-18 digits between optional
 *       spaces and tabs whose value is at least their count; else -1.
 *
 * Cost: one pass over the head's bytes (memchr for the line ends); no allocation.  ``buf`` is
 * any object with the buffer protocol (a bytearray takes the direct route); ValueError when
 * nbytes is negative or beyond the buffer.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const char CL_NAME[] = "content-length:"; /* lower case, after a CRLF */
#define CL_LEN ((Py_ssize_t)(sizeof(CL_NAME) - 1))
#define MAX_DIGITS 18

static int
lower_ascii(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

/* The scan itself on p[0:n]; see the header comment. */
static Py_ssize_t
scan(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t end = -1;
    Py_ssize_t cl_value = -1; /* where the first Content-Length value starts, or -1 */
    Py_ssize_t pos = 0;
    while (pos < n) {
        const unsigned char *lf = memchr(p + pos, '\n', (size_t)(n - pos));
        if (lf == NULL) {
            return -1; /* no whole head yet */
        }
        Py_ssize_t i = lf - p;
        if (i == 0 || p[i - 1] != '\r') {
            return -1; /* a bare LF: the general path (aiohttp's parser) judges it */
        }
        /* the line p[pos:i-1] ended; an empty line ends the head */
        if (i - 1 == pos && pos > 0) {
            end = i + 1;
            break;
        }
        if (cl_value < 0 && pos > 0 && i - 1 - pos >= CL_LEN) {
            Py_ssize_t k = 0;
            while (k < CL_LEN && lower_ascii(p[pos + k]) == (unsigned char)CL_NAME[k]) {
                k++;
            }
            if (k == CL_LEN) {
                cl_value = pos + CL_LEN;
            }
        }
        pos = i + 1;
    }
    if (end < 0) {
        return -1;
    }
    if (n == end) {
        return end;
    }
    if (cl_value < 0) {
        return -1;
    }
    /* value: OWS digits OWS up to the line's CR */
    Py_ssize_t q = cl_value;
    while (p[q] == ' ' || p[q] == '\t') {
        q++;
    }
    long long value = 0;
    int digits = 0;
    while (p[q] >= '0' && p[q] <= '9') {
        if (++digits > MAX_DIGITS) {
            return -1;
        }
        value = value * 10 + (p[q] - '0');
        q++;
    }
    if (!digits) {
        return -1;
    }
    while (p[q] == ' ' || p[q] == '\t') {
        q++;
    }
    if (p[q] != '\r') {
        return -1;
    }
    if (value < (long long)(n - end)) {
        return -1;
    }
    return end;
}

static PyObject *
chead_scan_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "scan_head() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *buf = args[0];
    Py_buffer view = {0};
    const unsigned char *p;
    Py_ssize_t len;
    if (PyByteArray_CheckExact(buf)) { /* the receive path's scratch: no buffer export */
        p = (const unsigned char *)PyByteArray_AS_STRING(buf);
        len = PyByteArray_GET_SIZE(buf);
    }
    else {
        if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        p = (const unsigned char *)view.buf;
        len = view.len;
    }
    Py_ssize_t r = -1;
    if (n < 0 || n > len) {
        PyErr_Format(PyExc_ValueError, "nbytes must be within 0..%zd, got %zd", len, n);
    }
    else {
        r = scan(p, n);
    }
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyLong_FromSsize_t(r);
}

static PyMethodDef chead_methods[] = {
    {"scan_head", (PyCFunction)(void (*)(void))chead_scan_head, METH_FASTCALL,
     "scan_head(buf, nbytes, /) -> int: where the one request head at the start of "
     "buf[:nbytes] ends, or -1 (see bufpool.aiohttp._headscan)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef chead_module = {
    PyModuleDef_HEAD_INIT,
    "bufpool.aiohttp._chead",
    "The zero-copy receive path's head scan in C (see bufpool.aiohttp._headscan).",
    -1,
    chead_methods,
};

PyMODINIT_FUNC
PyInit__chead(void)
{
    return PyModule_Create(&chead_module);
}
