/* The per-delivery loops of fan-out in C: the same Python objects, the same semantics as the pure-Python
 * loops of gateway/core/fastpath.py (the fallback, WSGATEWAY_FAST_PATH=false), which document them.
 *
 *   allowed(subs) -> targets
 *   fan_out(targets, seq, frame, size, max_msgs, max_bytes, dirty) -> (recipients, slow)
 *   flush_live(dirty, live, touched) -> rest
 *   direct(write) -> a Sink for uvloop's TCP transport write (see below), else `write` itself
 *   endpoints(fd) -> ((local host, port), (peer host, port)) of a TCP socket, or None (see below)
 *   sndbuf(fd, size) -> None: SO_SNDBUF, errors ignored
 *
 * Connections and frames are read and written through their __slots__ (member offsets taken from the
 * classes once, by `configure`), so a delivery costs no attribute lookup, no bytecode and no call but
 * the channel's write. Anything that is not exactly what the fast path expects (a target that is not a
 * Connection, a queue that is not a list) raises TypeError: a bug, never a client's doing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <netinet/in.h>

/* Offsets of the slots used here (configure); -1 until configured. */
static Py_ssize_t off_frames = -1, off_nbytes, off_last_seq, off_dirty, off_state, off_flag, off_native, off_write,
                  off_written, off_encode;
static Py_ssize_t off_data = -1, off_seq, off_sent;
static Py_ssize_t off_allowed = -1, off_conn;
static PyTypeObject *conn_type = NULL, *frame_type = NULL, *sub_type = NULL;
static PyObject *str_on = NULL;
/* The writable flag's `on`: a slot of the last flag type seen (one per channel kind), else getattr. */
static PyTypeObject *flag_type = NULL;
static Py_ssize_t off_on = -1;

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* --- Sink: a transport's write that sends on the socket itself while the transport holds nothing ---------
 *
 * uvloop's TCPTransport.write costs about a thousand instructions per call above the send(2) it makes
 * (buffer bookkeeping, flow-control checks). A Sink does the same for the common case directly: when the
 * transport is not closing (so its socket is open and still this connection's: uvloop closes the socket
 * only after `_closing` is set) and holds no bytes of its own (get_write_buffer_size() == 0: uvloop's
 * buffer and libuv's queue, so nothing can overtake them), one non-blocking send(2). Whatever it does not
 * send completely (a short write, EAGAIN, an error such as EPIPE) goes to transport.write, which buffers
 * the rest, pauses the protocol, or reports the error exactly as it would have. Only for uvloop's plain
 * TCPTransport (never TLS: that transport is another class). */
typedef struct {
    PyObject_HEAD
    PyObject *transport;
    int fd;
} Sink;

static PyObject *str_write = NULL, *str_is_closing = NULL, *str_get_write_buffer_size = NULL;
/* uvloop's TCPTransport and its methods (unbound: called with the transport as first argument, no lookup) */
static PyObject *tcp_transport_type = NULL, *tcp_transport_write = NULL, *tcp_is_closing = NULL,
                *tcp_get_write_buffer_size = NULL;

static inline PyObject *call_method(PyObject *func, PyObject *transport, PyObject *arg) {
    PyObject *args[2] = {transport, arg};
    return PyObject_Vectorcall(func, args, arg == NULL ? 1 : 2, NULL);
}

static PyObject *sink_write(Sink *s, PyObject *data) {
    if (PyBytes_CheckExact(data)) {
        PyObject *r = call_method(tcp_is_closing, s->transport, NULL);
        if (r == NULL) return NULL;
        int closing = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (closing < 0) return NULL;
        if (!closing) {
            r = call_method(tcp_get_write_buffer_size, s->transport, NULL);
            if (r == NULL) return NULL;
            Py_ssize_t pending = PyLong_AsSsize_t(r);
            Py_DECREF(r);
            if (pending == -1 && PyErr_Occurred()) return NULL;
            Py_ssize_t len = PyBytes_GET_SIZE(data);
            if (pending == 0 && len > 0) {
                const char *buf = PyBytes_AS_STRING(data);
                ssize_t k = send(s->fd, buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (k == len) Py_RETURN_NONE;
                if (k > 0) { /* the rest waits in the transport */
                    PyObject *rest = PyBytes_FromStringAndSize(buf + k, len - k);
                    if (rest == NULL) return NULL;
                    r = call_method(tcp_transport_write, s->transport, rest);
                    Py_DECREF(rest);
                    return r;
                }
            }
        }
    }
    return call_method(tcp_transport_write, s->transport, data);
}

static PyObject *sink_call(PyObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *data;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Sink() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Sink", 1, 1, &data)) return NULL;
    return sink_write((Sink *)self, data);
}

static int sink_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((Sink *)self)->transport);
    return 0;
}

static int sink_clear(PyObject *self) {
    Py_CLEAR(((Sink *)self)->transport);
    return 0;
}

static void sink_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    sink_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *sink_repr(PyObject *self) {
    return PyUnicode_FromFormat("<Sink fd=%d of %R>", ((Sink *)self)->fd, ((Sink *)self)->transport);
}

static PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gateway.core._fastpath.Sink",
    .tp_basicsize = sizeof(Sink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A uvloop TCP transport's write: send(2) directly while the transport holds nothing.",
    .tp_call = sink_call,
    .tp_traverse = sink_traverse,
    .tp_clear = sink_clear,
    .tp_dealloc = sink_dealloc,
    .tp_repr = sink_repr,
};

static PyObject *use_transport(PyObject *self, PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "use_transport: a class");
        return NULL;
    }
    PyObject *w = PyObject_GetAttr(cls, str_write);
    PyObject *c = PyObject_GetAttr(cls, str_is_closing);
    PyObject *g = PyObject_GetAttr(cls, str_get_write_buffer_size);
    if (w == NULL || c == NULL || g == NULL) {
        Py_XDECREF(w);
        Py_XDECREF(c);
        Py_XDECREF(g);
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(tcp_transport_type, cls);
    Py_XSETREF(tcp_transport_write, w);
    Py_XSETREF(tcp_is_closing, c);
    Py_XSETREF(tcp_get_write_buffer_size, g);
    Py_RETURN_NONE;
}

/* direct(write): a Sink when `write` is the bound write of a uvloop TCPTransport, else `write` itself. */
static PyObject *direct(PyObject *self, PyObject *write) {
    if (tcp_transport_type == NULL || !PyMethod_Check(write) || PyMethod_GET_FUNCTION(write) != tcp_transport_write ||
        (PyObject *)Py_TYPE(PyMethod_GET_SELF(write)) != tcp_transport_type) {
        Py_INCREF(write);
        return write;
    }
    PyObject *transport = PyMethod_GET_SELF(write);
    PyObject *sock = PyObject_CallMethod(transport, "get_extra_info", "s", "socket");
    PyObject *fileno = sock == NULL || sock == Py_None ? NULL : PyObject_CallMethod(sock, "fileno", NULL);
    Py_XDECREF(sock);
    long fd = fileno == NULL ? -1 : PyLong_AsLong(fileno);
    Py_XDECREF(fileno);
    if (fd < 0) { /* no socket to write to: the transport's own write */
        PyErr_Clear();
        Py_INCREF(write);
        return write;
    }
    Sink *s = PyObject_GC_New(Sink, &SinkType);
    if (s == NULL) return NULL;
    Py_INCREF(transport);
    s->transport = transport;
    s->fd = (int)fd;
    PyObject_GC_Track((PyObject *)s);
    return (PyObject *)s;
}

static int slot_offset(PyObject *cls, const char *name, Py_ssize_t *out) {
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL) return -1;
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type) || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%R.%s is not a __slots__ member", cls, name);
        Py_DECREF(d);
        return -1;
    }
    *out = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return 0;
}

/* A slot's value (borrowed), or NULL with AttributeError when it was never set. */
static inline PyObject *get_slot(PyObject *o, Py_ssize_t off, const char *name) {
    PyObject *v = SLOT(o, off);
    if (v == NULL) PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute '%s'", Py_TYPE(o)->tp_name, name);
    return v;
}

/* Store `v` (a new reference, stolen) in a slot; the old value is released. */
static inline void set_slot(PyObject *o, Py_ssize_t off, PyObject *v) {
    PyObject *old = SLOT(o, off);
    SLOT(o, off) = v;
    Py_XDECREF(old);
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *conn_cls, *frame_cls, *sub_cls;
    if (!PyArg_ParseTuple(args, "O!O!O!:configure", &PyType_Type, &conn_cls, &PyType_Type, &frame_cls,
                          &PyType_Type, &sub_cls))
        return NULL;
    Py_ssize_t f[10], g[3], h[2];
    if (slot_offset(conn_cls, "frames", &f[0]) || slot_offset(conn_cls, "nbytes", &f[1]) ||
        slot_offset(conn_cls, "last_seq", &f[2]) || slot_offset(conn_cls, "dirty", &f[3]) ||
        slot_offset(conn_cls, "state", &f[4]) || slot_offset(conn_cls, "flag", &f[5]) ||
        slot_offset(conn_cls, "native", &f[6]) || slot_offset(conn_cls, "write", &f[7]) ||
        slot_offset(conn_cls, "written", &f[8]) || slot_offset(conn_cls, "encode", &f[9]) ||
        slot_offset(frame_cls, "data", &g[0]) || slot_offset(frame_cls, "seq", &g[1]) ||
        slot_offset(frame_cls, "sent", &g[2]) || slot_offset(sub_cls, "allowed", &h[0]) ||
        slot_offset(sub_cls, "conn", &h[1]))
        return NULL;
    off_frames = f[0], off_nbytes = f[1], off_last_seq = f[2], off_dirty = f[3], off_state = f[4];
    off_flag = f[5], off_native = f[6], off_write = f[7], off_written = f[8], off_encode = f[9];
    off_data = g[0], off_seq = g[1], off_sent = g[2];
    off_allowed = h[0], off_conn = h[1];
    Py_INCREF(conn_cls);
    Py_XSETREF(conn_type, (PyTypeObject *)conn_cls);
    Py_INCREF(frame_cls);
    Py_XSETREF(frame_type, (PyTypeObject *)frame_cls);
    Py_INCREF(sub_cls);
    Py_XSETREF(sub_type, (PyTypeObject *)sub_cls);
    Py_RETURN_NONE;
}

static int configured(void) {
    if (off_frames < 0 || off_data < 0 || off_allowed < 0) {
        PyErr_SetString(PyExc_RuntimeError, "gateway.core._fastpath: configure() was not called");
        return 0;
    }
    return 1;
}

static inline int check_conn(PyObject *c) {
    if (!PyObject_TypeCheck(c, conn_type)) {
        PyErr_Format(PyExc_TypeError, "fast path: expected a Connection, got %.100s", Py_TYPE(c)->tp_name);
        return 0;
    }
    return 1;
}

static inline int check_frame(PyObject *f) {
    if (!PyObject_TypeCheck(f, frame_type)) {
        PyErr_Format(PyExc_TypeError, "fast path: expected an OutFrame, got %.100s", Py_TYPE(f)->tp_name);
        return 0;
    }
    return 1;
}

/* flag.on as 1/0, -1 on error. */
static inline int flag_on(PyObject *flag) {
    PyTypeObject *t = Py_TYPE(flag);
    if (t != flag_type) {
        PyObject *d = _PyType_Lookup(t, str_on); /* borrowed */
        Py_ssize_t off = -1;
        if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type) &&
            ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX)
            off = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_INCREF(t);
        Py_XSETREF(flag_type, t);
        off_on = off;
    }
    if (off_on >= 0) {
        PyObject *v = SLOT(flag, off_on);
        if (v == Py_True) return 1;
        if (v == Py_False) return 0;
        if (v != NULL) return PyObject_IsTrue(v);
    }
    PyObject *on = PyObject_GetAttr(flag, str_on);
    if (on == NULL) return -1;
    int r = PyObject_IsTrue(on);
    Py_DECREF(on);
    return r;
}

/* allowed: the connections of the subscriptions (dict keys) whose permission flag is set. */
static PyObject *allowed(PyObject *self, PyObject *subs) {
    if (!configured()) return NULL;
    if (!PyDict_CheckExact(subs)) {
        PyErr_SetString(PyExc_TypeError, "allowed: subs must be a dict");
        return NULL;
    }
    PyObject *out = PyList_New(0), *sub, *value;
    if (out == NULL) return NULL;
    Py_ssize_t pos = 0;
    while (PyDict_Next(subs, &pos, &sub, &value)) {
        if (!PyObject_TypeCheck(sub, sub_type)) {
            PyErr_Format(PyExc_TypeError, "fast path: expected a Subscription, got %.100s", Py_TYPE(sub)->tp_name);
            goto fail;
        }
        PyObject *ok = get_slot(sub, off_allowed, "allowed");
        if (ok == NULL) goto fail;
        int is_ok = ok == Py_True ? 1 : ok == Py_False ? 0 : PyObject_IsTrue(ok);
        if (is_ok < 0) goto fail;
        if (!is_ok) continue;
        PyObject *c = get_slot(sub, off_conn, "conn");
        if (c == NULL || PyList_Append(out, c) < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* fan_out: append one frame to every target's live queue (see fastpath.py, fan_out_py). */
static PyObject *fan_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "fan_out(targets, seq, frame, size, max_msgs, max_bytes, dirty)");
        return NULL;
    }
    if (!configured()) return NULL;
    PyObject *targets = args[0], *seq_obj = args[1], *frame = args[2], *dirty = args[6];
    if (!PyList_CheckExact(targets) || !PyList_CheckExact(dirty)) {
        PyErr_SetString(PyExc_TypeError, "fan_out: targets and dirty must be lists");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(seq_obj);
    Py_ssize_t size = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_msgs = PyLong_AsSsize_t(args[4]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) return NULL;
    PyObject *slow = PyList_New(0);
    if (slow == NULL) return NULL;
    Py_ssize_t recipients = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(targets); i++) {
        PyObject *c = PyList_GET_ITEM(targets, i);
        if (!check_conn(c)) goto fail;
        PyObject *last = get_slot(c, off_last_seq, "last_seq");
        if (last == NULL) goto fail;
        long long lv = PyLong_AsLongLong(last);
        if (lv == -1 && PyErr_Occurred()) goto fail;
        if (seq <= lv) continue; /* already queued through another subscription (a scope and `*`) */
        PyObject *p = get_slot(c, off_frames, "frames");
        if (p == NULL) goto fail;
        if (!PyList_CheckExact(p)) {
            PyErr_SetString(PyExc_TypeError, "fan_out: a connection's frames must be a list");
            goto fail;
        }
        PyObject *nb = get_slot(c, off_nbytes, "nbytes");
        if (nb == NULL) goto fail;
        Py_ssize_t nbytes = PyLong_AsSsize_t(nb);
        if (nbytes == -1 && PyErr_Occurred()) goto fail;
        nbytes += size;
        PyObject *nb_new = PyLong_FromSsize_t(nbytes);
        if (nb_new == NULL) goto fail;
        if (PyList_Append(p, frame) < 0) {
            Py_DECREF(nb_new);
            goto fail;
        }
        Py_INCREF(seq_obj);
        set_slot(c, off_last_seq, seq_obj);
        set_slot(c, off_nbytes, nb_new);
        recipients++;
        if (SLOT(c, off_dirty) != Py_True) {
            if (PyList_Append(dirty, c) < 0) goto fail;
            Py_INCREF(Py_True);
            set_slot(c, off_dirty, Py_True);
        }
        if (PyList_GET_SIZE(p) > max_msgs || nbytes > max_bytes) {
            if (PyList_Append(slow, c) < 0) goto fail;
        }
    }
    return Py_BuildValue("(nN)", recipients, slow);
fail:
    Py_DECREF(slow);
    return NULL;
}

/* The frames' WebSocket bytes joined (each frame's data is one complete frame). */
static PyObject *join_data(PyObject *p) {
    Py_ssize_t n = PyList_GET_SIZE(p), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyList_GET_ITEM(p, i);
        if (!check_frame(f)) return NULL;
        PyObject *d = get_slot(f, off_data, "data");
        if (d == NULL) return NULL;
        if (!PyBytes_CheckExact(d)) {
            PyErr_SetString(PyExc_TypeError, "flush_live: a frame's data must be bytes");
            return NULL;
        }
        total += PyBytes_GET_SIZE(d);
    }
    if (n == 1) {
        PyObject *d = SLOT(PyList_GET_ITEM(p, 0), off_data);
        Py_INCREF(d);
        return d;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = SLOT(PyList_GET_ITEM(p, i), off_data);
        memcpy(w, PyBytes_AS_STRING(d), PyBytes_GET_SIZE(d));
        w += PyBytes_GET_SIZE(d);
    }
    return out;
}

/* flush_live: write every LIVE dirty connection's frames in one write (see fastpath.py, flush_live_py). */
static PyObject *flush_live(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "flush_live(dirty, live, touched)");
        return NULL;
    }
    if (!configured()) return NULL;
    PyObject *dirty = args[0], *live = args[1], *touched = args[2];
    if (!PyList_CheckExact(dirty) || !PyList_CheckExact(touched)) {
        PyErr_SetString(PyExc_TypeError, "flush_live: dirty and touched must be lists");
        return NULL;
    }
    PyObject *rest = PyList_New(0), *c = NULL;
    if (rest == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dirty); i++) {
        c = PyList_GET_ITEM(dirty, i);
        if (!check_conn(c)) goto fail;
        Py_INCREF(c); /* a write may run Python code (pause_writing, connection_lost) */
        Py_INCREF(Py_False);
        set_slot(c, off_dirty, Py_False);
        PyObject *st = get_slot(c, off_state, "state");
        if (st == NULL) goto fail_c;
        if (st != live) {
            if (PyList_Append(rest, c) < 0) goto fail_c;
            Py_DECREF(c);
            continue;
        }
        PyObject *p = get_slot(c, off_frames, "frames");
        if (p == NULL) goto fail_c;
        if (!PyList_CheckExact(p)) {
            PyErr_SetString(PyExc_TypeError, "flush_live: a connection's frames must be a list");
            goto fail_c;
        }
        if (PyList_GET_SIZE(p) == 0) {
            Py_DECREF(c);
            continue;
        }
        PyObject *flag = get_slot(c, off_flag, "flag");
        if (flag == NULL) goto fail_c;
        int is_on = flag_on(flag);
        if (is_on < 0) goto fail_c;
        if (!is_on) { /* no room: `on_writable` marks it again */
            Py_DECREF(c);
            continue;
        }
        Py_INCREF(p);
        PyObject *native = get_slot(c, off_native, "native");
        PyObject *data = NULL;
        if (native == NULL) goto fail_p;
        int is_native = PyObject_IsTrue(native);
        if (is_native < 0) goto fail_p;
        if (is_native) {
            data = join_data(p);
        } else {
            PyObject *encode = get_slot(c, off_encode, "encode");
            if (encode == NULL) goto fail_p;
            data = PyObject_CallOneArg(encode, p);
        }
        if (data == NULL) goto fail_p;
        PyObject *write = get_slot(c, off_write, "write");
        if (write == NULL) {
            Py_DECREF(data);
            goto fail_p;
        }
        Py_INCREF(write);
        PyObject *r = Py_IS_TYPE(write, &SinkType) ? sink_write((Sink *)write, data) : PyObject_CallOneArg(write, data);
        Py_DECREF(write);
        Py_DECREF(data);
        if (r == NULL) goto fail_p;
        Py_DECREF(r);
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(p); j++) { /* one check per delivery */
            PyObject *f = PyList_GET_ITEM(p, j);
            if (!check_frame(f)) goto fail_p;
            PyObject *seq = get_slot(f, off_seq, "seq");
            if (seq == NULL) goto fail_p;
            int has_seq = PyObject_IsTrue(seq);
            if (has_seq < 0) goto fail_p;
            if (!has_seq) continue; /* a control frame */
            PyObject *sent = get_slot(f, off_sent, "sent");
            if (sent == NULL) goto fail_p;
            Py_ssize_t n = PyLong_AsSsize_t(sent);
            if (n == -1 && PyErr_Occurred()) goto fail_p;
            if (n == 0 && PyList_Append(touched, f) < 0) goto fail_p;
            PyObject *n_new = PyLong_FromSsize_t(n + 1);
            if (n_new == NULL) goto fail_p;
            set_slot(f, off_sent, n_new);
        }
        PyObject *last = get_slot(c, off_last_seq, "last_seq");
        if (last == NULL) goto fail_p;
        Py_INCREF(last);
        set_slot(c, off_written, last); /* everything queued is now handed to the channel */
        if (SLOT(c, off_frames) == p) { /* emptied in place: no new list per write */
            if (PyList_SetSlice(p, 0, PY_SSIZE_T_MAX, NULL) < 0) goto fail_p;
        } else { /* the write's callbacks gave the connection another list (as the Python loop) */
            PyObject *empty = PyList_New(0);
            if (empty == NULL) goto fail_p;
            set_slot(c, off_frames, empty);
        }
        Py_DECREF(p);
        set_slot(c, off_nbytes, PyLong_FromLong(0));
        Py_DECREF(c);
        continue;
    fail_p:
        Py_DECREF(p);
        goto fail_c;
    }
    return rest;
fail_c:
    Py_DECREF(c); /* the reference taken at the top of the loop body */
fail:
    Py_DECREF(rest);
    return NULL;
}

/* --- a new connection's addresses, without a Python socket object per question -------------------------
 *
 * uvicorn reads a connection's local and peer addresses through the transport's socket; with uvloop each
 * getsockname(), getpeername() and setsockopt() of its PseudoSocket builds and detaches a Python socket
 * object (a twelfth of a handshake, for the three). Here: the two system calls, and the addresses as the
 * socket module formats them (numeric host, port) for IPv4 and IPv6 without a scope id; None for anything
 * else (a Unix socket, a scoped address, an error), which the caller reads the Python way. */
static PyObject *inet_address(const struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL) return NULL;
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (a->sin6_scope_id != 0 || inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host) == NULL) return NULL;
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin6_port));
    }
    return NULL;
}

static PyObject *endpoints(PyObject *self, PyObject *arg) {
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred()) return NULL;
    if (value < 0 || value > INT_MAX) Py_RETURN_NONE;
    int fd = (int)value;
    struct sockaddr_storage local, peer;
    socklen_t local_len = sizeof local, peer_len = sizeof peer;
    if (getsockname(fd, (struct sockaddr *)&local, &local_len) != 0 ||
        getpeername(fd, (struct sockaddr *)&peer, &peer_len) != 0)
        Py_RETURN_NONE;
    PyObject *l = inet_address(&local);
    if (l == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *p = inet_address(&peer);
    if (p == NULL) {
        Py_DECREF(l);
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *r = PyTuple_Pack(2, l, p);
    Py_DECREF(l);
    Py_DECREF(p);
    return r;
}

static PyObject *sndbuf(PyObject *self, PyObject *args) {
    int fd, size;
    if (!PyArg_ParseTuple(args, "ii", &fd, &size)) return NULL;
    if (fd >= 0 && size > 0) (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Connection, OutFrame, Subscription): take the slot offsets of the three classes."},
    {"use_transport", use_transport, METH_O, "use_transport(uvloop.loop.TCPTransport): the class `direct` knows."},
    {"direct", direct, METH_O, "direct(write) -> a Sink for a uvloop TCPTransport's bound write, else write"},
    {"endpoints", endpoints, METH_O, "endpoints(fd) -> ((local host, port), (peer host, port)), or None"},
    {"sndbuf", sndbuf, METH_VARARGS, "sndbuf(fd, size): SO_SNDBUF (size > 0), errors ignored"},
    {"allowed", allowed, METH_O, "allowed(subs) -> the connections of the subscriptions allowed to see the scope"},
    {"fan_out", (PyCFunction)(void (*)(void))fan_out, METH_FASTCALL,
     "fan_out(targets, seq, frame, size, max_msgs, max_bytes, dirty) -> (recipients, slow)"},
    {"flush_live", (PyCFunction)(void (*)(void))flush_live, METH_FASTCALL,
     "flush_live(dirty, live, touched) -> the connections that are not LIVE"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway.core._fastpath",
    "The per-delivery loops of fan-out in C (gateway/core/fastpath.py has the Python fallback).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    str_on = PyUnicode_InternFromString("on");
    str_write = PyUnicode_InternFromString("write");
    str_is_closing = PyUnicode_InternFromString("is_closing");
    str_get_write_buffer_size = PyUnicode_InternFromString("get_write_buffer_size");
    if (str_on == NULL || str_write == NULL || str_is_closing == NULL || str_get_write_buffer_size == NULL)
        return NULL;
    if (PyType_Ready(&SinkType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&SinkType);
    if (PyModule_AddObject(m, "Sink", (PyObject *)&SinkType) < 0) {
        Py_DECREF(&SinkType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
