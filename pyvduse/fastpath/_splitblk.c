/*
 * The optional native data path: one virtio-blk split virtqueue served in C, or one of
 * virtio-net's two over a TAP (splitblk_net.c). This file is the Python object and the
 * module; the engine's other parts are named in splitblk.h.
 *
 * Why: under emulation the Python queue worker costs ~750 us of CPU per request, most of it
 * spread thinly over the interpreter (see README, Performance). This loop does the same
 * steps as pyvduse.runtime.worker + ring.split + ring.inflight + device.blk for the common
 * requests (IN, OUT, FLUSH, GET_ID) with the GIL released, so queues also run in parallel.
 *
 * Many requests in flight: with tuning.aio AIO_URING and the file backend, reads, writes and
 * flushes go to an io_uring the engine owns (splitblk_uring.c), as many as the queue holds,
 * and complete in the order they finish: used elements are written in completion order, and
 * the in-flight log records each head IN_FLIGHT at its take, COMPLETED at its push and FREE
 * once published, whatever the order. The table of requests in flight is indexed by head
 * (Engine.reqs), with a list in take order for the oldest; the map shared with Python
 * (`inflight`, one byte per head) says which heads are taken and not completed, so a driver
 * offering one of them again is left to Python, whose ring breaks the queue. With
 * aio=AIO_SYNC (the default), the null and memory backends and GET_ID, requests complete
 * inline, one at a time, as before.
 *
 * It is deliberately conservative: anything it does not fully like -- a chain that is
 * malformed, names memory outside the regions it was given, holds too many segments, a
 * request type other than the four, an avail index that ran away, a head out of range or
 * still in flight, a direct-I/O request at an offset or of a length not aligned for it -- it
 * leaves untaken and returns RUN_DEFER, and the Python path (the reference, with its own
 * validation, logging and fault-in of new IOTLB regions) takes exactly that chain, on the
 * same ring and log, while this engine's requests stay in flight; run() publishes everything
 * it pushed before it returns. So the hostile-ring guarantees are those of the Python engine,
 * and every byte of driver memory this engine touches, or lets the kernel touch, was checked
 * against a region first.
 *
 * Driver memory that requests in flight point into is kept alive: set_regions() starts a new
 * generation and an old one is released only when the last request taken under it has
 * completed (splitblk_ring.c). close() refuses while requests are in flight (wait_idle() or
 * abandon() first); an engine deallocated with transfers still in the kernel leaks their
 * memory on purpose (see Engine_dealloc).
 */
#include "splitblk.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/vfs.h>
#include <unistd.h>

#if defined(SB_NBD)
#define SB_MODULE "_splitblk_full"
#define SB_INIT PyInit__splitblk_full
#elif defined(SB_URING)
#define SB_MODULE "_splitblk_uring"
#define SB_INIT PyInit__splitblk_uring
#else
#define SB_MODULE "_splitblk"
#define SB_INIT PyInit__splitblk
#endif

/* The file's data is in memory (tmpfs, ramfs): a read of it never waits for a device. */
static int fd_in_memory(int fd)
{
    struct statfs st;
    return fd >= 0 && fstatfs(fd, &st) == 0 &&
           (st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC);
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t min_len, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len < min_len) {
        PyBuffer_Release(view);
        view->obj = NULL;
        PyErr_Format(PyExc_ValueError, "%s buffer too small", what);
        return -1;
    }
    return 0;
}

/* -- the constructor's argument -------------------------------------------------------
 *
 * Engine(config): an object with the groups ring, device, storage, interrupts, tuning and
 * test, each with the attributes pyvduse/fastpath/config.py documents. Everything is read
 * into a Config first, so a missing or mistyped attribute is refused (TypeError naming it)
 * before the engine holds anything; values out of range are ValueErrors. */

typedef struct {
    /* ring */
    PyObject *regions, *log, *inflight;
    uint64_t num, desc, avail, used, last_avail, used_idx, signalled;
    int event_idx, indirect;
    /* device */
    uint64_t dev_kind;
    PyObject *capacity, *link;
    int readonly, guest_csum;
    uint8_t serial[ID_BYTES];
    Py_ssize_t serial_len;
    /* storage */
    uint64_t backend, dio_align, nbd_max;
    int fd, direct, nbd_fua;
    PyObject *memory, *nbd, *unpinnable, *on_unpinnable;
    /* interrupts */
    int irq_fd, affinity_fd;
    uint64_t irq_request, irq_index, follow_mask;
    PyObject *notify, *on_error;
    /* tuning */
    uint64_t aio, poll_ns, publish_ns, hold_ns, budget;
    int bounce, nowait;
    /* test */
    int gate_fd, test_serial;
    uint64_t gate_mask, test_efault;
} Config;

static void config_clear(Config *c)
{
    Py_CLEAR(c->regions);
    Py_CLEAR(c->log);
    Py_CLEAR(c->inflight);
    Py_CLEAR(c->capacity);
    Py_CLEAR(c->link);
    Py_CLEAR(c->memory);
    Py_CLEAR(c->nbd);
    Py_CLEAR(c->unpinnable);
    Py_CLEAR(c->on_unpinnable);
    Py_CLEAR(c->notify);
    Py_CLEAR(c->on_error);
}

/* Attribute `name` of config group `group` (a new reference), or NULL with a TypeError. */
static PyObject *cfg_attr(PyObject *obj, const char *group, const char *name)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        if (*group)
            PyErr_Format(PyExc_TypeError, "engine config: %s has no attribute '%s'", group, name);
        else
            PyErr_Format(PyExc_TypeError, "engine config: no attribute '%s' (the groups: ring, "
                         "device, storage, interrupts, tuning, test)", name);
    }
    return v;
}

static int cfg_type_error(PyObject *v, const char *group, const char *name, const char *want)
{
    PyErr_Format(PyExc_TypeError, "engine config: %s.%s must be %s, not %.80s", group, name,
                 want, Py_TYPE(v)->tp_name);
    Py_DECREF(v);
    return -1;
}

/* An int from min to max (min >= -1). */
static int cfg_int(PyObject *g, const char *group, const char *name, long long min,
                   unsigned long long max, uint64_t *out)
{
    PyObject *v = cfg_attr(g, group, name);
    int overflow = 0;
    long long x;
    if (v == NULL)
        return -1;
    if (!PyLong_Check(v))
        return cfg_type_error(v, group, name, "an int");
    x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow > 0) { /* above LLONG_MAX: only a u64 can hold it */
        unsigned long long u = PyLong_AsUnsignedLongLong(v);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear();
        else if (u <= max) {
            Py_DECREF(v);
            *out = u;
            return 0;
        }
    }
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < min || (x >= 0 && (unsigned long long)x > max)) {
        PyErr_Format(PyExc_ValueError, "engine config: %s.%s must be %lld to %llu", group,
                     name, min, max);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

static int cfg_fd(PyObject *g, const char *group, const char *name, int *out)
{
    uint64_t v;
    if (cfg_int(g, group, name, -1, INT_MAX, &v) < 0)
        return -1;
    *out = (int)(int64_t)v;
    return 0;
}

static int cfg_bool(PyObject *g, const char *group, const char *name, int *out)
{
    PyObject *v = cfg_attr(g, group, name);
    if (v == NULL)
        return -1;
    if (!PyLong_Check(v)) /* bool, or an int */
        return cfg_type_error(v, group, name, "a bool");
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return 0;
}

/* Any object (kept in *out), None allowed or not. */
static int cfg_object(PyObject *g, const char *group, const char *name, int none_ok,
                      PyObject **out)
{
    PyObject *v = cfg_attr(g, group, name);
    if (v == NULL)
        return -1;
    if (v == Py_None && !none_ok)
        return cfg_type_error(v, group, name, "given");
    *out = v;
    return 0;
}

static int cfg_callable(PyObject *g, const char *group, const char *name, PyObject **out)
{
    if (cfg_object(g, group, name, 1, out) < 0)
        return -1;
    if (*out != Py_None && !PyCallable_Check(*out)) {
        int r = cfg_type_error(*out, group, name, "callable or None");
        *out = NULL;
        return r;
    }
    return 0;
}

static int read_ring(PyObject *g, Config *c)
{
    const char *r = "ring";
    return cfg_object(g, r, "regions", 0, &c->regions) < 0 ||
           cfg_int(g, r, "num", 0, 32768, &c->num) < 0 ||
           cfg_int(g, r, "desc", 0, UINT64_MAX, &c->desc) < 0 ||
           cfg_int(g, r, "avail", 0, UINT64_MAX, &c->avail) < 0 ||
           cfg_int(g, r, "used", 0, UINT64_MAX, &c->used) < 0 ||
           cfg_bool(g, r, "event_idx", &c->event_idx) < 0 ||
           cfg_bool(g, r, "indirect", &c->indirect) < 0 ||
           cfg_int(g, r, "last_avail", 0, UINT16_MAX, &c->last_avail) < 0 ||
           cfg_int(g, r, "used_idx", 0, UINT16_MAX, &c->used_idx) < 0 ||
           cfg_int(g, r, "signalled", 0, UINT16_MAX, &c->signalled) < 0 ||
           cfg_object(g, r, "log", 1, &c->log) < 0 ||
           cfg_object(g, r, "inflight", 1, &c->inflight) < 0
               ? -1 : 0;
}

static int read_device(PyObject *g, Config *c)
{
    PyObject *serial;
    if (cfg_int(g, "device", "kind", DEV_BLK, DEV_NET_TX, &c->dev_kind) < 0 ||
        cfg_object(g, "device", "capacity", 1, &c->capacity) < 0 ||
        cfg_object(g, "device", "link", 1, &c->link) < 0 ||
        cfg_bool(g, "device", "guest_csum", &c->guest_csum) < 0 ||
        cfg_bool(g, "device", "readonly", &c->readonly) < 0 ||
        cfg_object(g, "device", "serial", 0, &serial) < 0)
        return -1;
    if (!PyBytes_Check(serial))
        return cfg_type_error(serial, "device", "serial", "bytes");
    c->serial_len = PyBytes_GET_SIZE(serial);
    if (c->serial_len > ID_BYTES) {
        Py_DECREF(serial);
        PyErr_Format(PyExc_ValueError, "engine config: device.serial is longer than %d bytes",
                     ID_BYTES);
        return -1;
    }
    memcpy(c->serial, PyBytes_AS_STRING(serial), (size_t)c->serial_len);
    Py_DECREF(serial);
    return 0;
}

static int read_storage(PyObject *g, Config *c)
{
    const char *s = "storage";
    return cfg_int(g, s, "kind", BACKEND_NULL, BACKEND_TAP, &c->backend) < 0 ||
           cfg_fd(g, s, "fd", &c->fd) < 0 ||
           cfg_bool(g, s, "direct", &c->direct) < 0 ||
           cfg_int(g, s, "dio_align", 1, BOUNCE_CHUNK, &c->dio_align) < 0 ||
           cfg_object(g, s, "memory", 1, &c->memory) < 0 ||
           cfg_object(g, s, "unpinnable", 1, &c->unpinnable) < 0 ||
           cfg_callable(g, s, "on_unpinnable", &c->on_unpinnable) < 0 ||
           cfg_object(g, s, "nbd", 1, &c->nbd) < 0 ||
           cfg_bool(g, s, "nbd_fua", &c->nbd_fua) < 0 ||
           cfg_int(g, s, "nbd_max", 1, UINT32_MAX, &c->nbd_max) < 0
               ? -1 : 0;
}

static int read_interrupts(PyObject *g, Config *c)
{
    const char *i = "interrupts";
    return cfg_fd(g, i, "irq_fd", &c->irq_fd) < 0 ||
           cfg_int(g, i, "irq_request", 0, ULONG_MAX, &c->irq_request) < 0 ||
           cfg_int(g, i, "irq_index", 0, UINT32_MAX, &c->irq_index) < 0 ||
           cfg_callable(g, i, "notify", &c->notify) < 0 ||
           cfg_callable(g, i, "on_error", &c->on_error) < 0 ||
           cfg_fd(g, i, "affinity_fd", &c->affinity_fd) < 0 ||
           cfg_int(g, i, "follow_mask", 0, UINT64_MAX, &c->follow_mask) < 0
               ? -1 : 0;
}

static int read_tuning(PyObject *g, Config *c)
{
    const char *t = "tuning";
    return cfg_int(g, t, "aio", AIO_SYNC, AIO_NBD, &c->aio) < 0 ||
           cfg_bool(g, t, "bounce", &c->bounce) < 0 ||
           cfg_bool(g, t, "nowait", &c->nowait) < 0 ||
           cfg_int(g, t, "poll_ns", 0, UINT64_MAX, &c->poll_ns) < 0 ||
           cfg_int(g, t, "publish_ns", 0, UINT64_MAX, &c->publish_ns) < 0 ||
           cfg_int(g, t, "hold_ns", 0, UINT64_MAX, &c->hold_ns) < 0 ||
           cfg_int(g, t, "budget", 0, UINT32_MAX, &c->budget) < 0
               ? -1 : 0;
}

static int read_test(PyObject *g, Config *c)
{
    const char *t = "test";
    return cfg_fd(g, t, "gate_fd", &c->gate_fd) < 0 ||
           cfg_int(g, t, "gate_mask", 0, UINT64_MAX, &c->gate_mask) < 0 ||
           cfg_int(g, t, "efault", 0, UINT64_MAX, &c->test_efault) < 0 ||
           cfg_bool(g, t, "serial", &c->test_serial) < 0
               ? -1 : 0;
}

static int read_config(PyObject *config, Config *c)
{
    static const struct {
        const char *name;
        int (*read)(PyObject *, Config *);
    } groups[] = {{"ring", read_ring},   {"device", read_device}, {"storage", read_storage},
                  {"interrupts", read_interrupts}, {"tuning", read_tuning},
                  {"test", read_test}};
    for (size_t k = 0; k < sizeof groups / sizeof groups[0]; k++) {
        PyObject *g = cfg_attr(config, "", groups[k].name);
        int r;
        if (g == NULL)
            return -1;
        r = groups[k].read(g, c);
        Py_DECREF(g);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* Check what the config asks for and hold it: the engine's part of __init__. */
static int engine_setup(Engine *e, const Config *c)
{
    uint32_t num = (uint32_t)c->num;
    int backend = (int)c->backend, aio = (int)c->aio;

    if (num == 0 || (num & (num - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two up to 32768");
        return -1;
    }
    if ((backend == BACKEND_NBD) != (aio == AIO_NBD)) {
        PyErr_SetString(PyExc_ValueError, "tuning.aio must be AIO_SYNC or AIO_URING, or "
                        "AIO_NBD with storage.kind BACKEND_NBD");
        return -1;
    }
#ifndef SB_NBD
    if (backend == BACKEND_NBD) {
        PyErr_SetString(PyExc_ValueError, "BACKEND_NBD: this build of the engine has no libnbd");
        return -1;
    }
#endif
#ifndef SB_URING
    if (aio == AIO_URING) {
        PyErr_SetString(PyExc_ValueError,
                        "AIO_URING: this build of the engine has no io_uring (liburing)");
        return -1;
    }
#endif
    if (c->dio_align & (c->dio_align - 1)) {
        PyErr_SetString(PyExc_ValueError, "dio_align must be a power of two up to 1 MiB");
        return -1;
    }
    if ((backend == BACKEND_FD || backend == BACKEND_TAP) && c->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd or TAP backend without an fd");
        return -1;
    }
    if ((backend == BACKEND_TAP) != (c->dev_kind != DEV_BLK) ||
        (backend == BACKEND_TAP && aio != AIO_SYNC)) {
        PyErr_SetString(PyExc_ValueError, "a virtio-net queue (device.kind) needs storage.kind "
                        "BACKEND_TAP with tuning.aio AIO_SYNC, and a TAP a virtio-net queue");
        return -1;
    }
    if (c->dev_kind == DEV_BLK && c->capacity == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a virtio-blk queue needs device.capacity");
        return -1;
    }
    if ((e->mem_cur = sb_load_regions(c->regions)) == NULL)
        return -1;
    e->num = num;
    e->event_idx = c->event_idx;
    e->indirect = c->indirect;
    e->desc_iova = c->desc;
    e->avail_iova = c->avail;
    e->used_iova = c->used;
    if (sb_check_layout(e) < 0 || sb_map_ring(e) < 0)
        return -1;
    e->last_avail = e->avail_seen = (uint16_t)c->last_avail;
    e->used_idx = (uint16_t)c->used_idx;
    e->signalled = (uint16_t)c->signalled;
    e->dev_kind = (int)c->dev_kind;
    if (c->capacity != Py_None) {
        if (get_buffer(c->capacity, &e->cap_view, 8, "capacity") < 0)
            return -1;
        e->capacity = (volatile uint64_t *)e->cap_view.buf;
    }
    if (c->link != Py_None) {
        if (get_buffer(c->link, &e->link_view, 1, "link") < 0)
            return -1;
        e->link = e->link_view.buf;
    }
    e->guest_csum = c->guest_csum;
    if (e->dev_kind == DEV_NET_RX && (e->rx_scratch = malloc(NET_MAX_PACKET)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->readonly = c->readonly;
    memset(e->serial, 0, ID_BYTES);
    memcpy(e->serial, c->serial, (size_t)c->serial_len);
    e->backend = backend;
    e->fd = c->fd;
    if (backend == BACKEND_FD) {
        /* The engine's own fd of the file (the same open file, another number): the caller
         * closing its number, or a stray close of it, cannot hand the engine's I/O to
         * whatever takes that number next (an eventfd or a pipe, where an io_uring read
         * waits for good: issue 34). */
        if ((e->fd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0)) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        e->own_fd = 1;
    }
    e->aio = aio;
    e->direct = c->direct && backend == BACKEND_FD;
    e->bounce_all = c->bounce && backend == BACKEND_FD;
    e->resident = backend == BACKEND_FD && fd_in_memory(c->fd);
    if (c->unpinnable != Py_None) {
        if (get_buffer(c->unpinnable, &e->unpin_view, 1, "unpinnable") < 0)
            return -1;
        e->unpinnable = e->unpin_view.buf;
    }
    if (c->on_unpinnable != Py_None) {
        Py_INCREF(c->on_unpinnable);
        e->on_unpinnable = c->on_unpinnable;
    }
    e->dio_align = c->dio_align;
    if (backend == BACKEND_MEMORY) {
        if (c->memory == Py_None) {
            PyErr_SetString(PyExc_ValueError, "memory backend without storage.memory");
            return -1;
        }
        if (get_buffer(c->memory, &e->mem_view, 0, "memory") < 0)
            return -1;
        e->mem = e->mem_view.buf;
        e->mem_size = (uint64_t)e->mem_view.len;
    }
    if (c->log != Py_None) {
        if (get_buffer(c->log, &e->log_view, LOG_HEADER + LOG_ENTRY * (Py_ssize_t)num, "log") < 0)
            return -1;
        e->log = e->log_view.buf;
    }
    if (c->inflight != Py_None) {
        if (get_buffer(c->inflight, &e->map_view, (Py_ssize_t)num, "inflight") < 0)
            return -1;
        e->map = e->map_view.buf;
    } else if ((e->map = PyMem_Calloc(num, 1)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->batch = PyMem_Calloc(num, sizeof(uint16_t));
    e->reqs = PyMem_Calloc(num, sizeof(Req));
    e->gate_buf = calloc(1, 64);
    if (e->batch == NULL || e->reqs == NULL || e->gate_buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t k = 0; k < num; k++) {
        e->reqs[k].prev = e->reqs[k].next = -1;
        e->reqs[k].eng = e;
    }
    if (backend == BACKEND_NBD) {
        if ((e->nbd_ready = PyMem_Calloc(num, sizeof(uint16_t))) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        e->nbd_fua = c->nbd_fua;
        e->nbd_max = c->nbd_max;
        if (sb_nbd_set(e, c->nbd) < 0)
            return -1;
    }
    e->budget = c->budget ? (uint32_t)c->budget : BUDGET_PER_SLOT * num;
    e->credit = e->budget;
    e->backoff_ns = BUDGET_SLEEP_MIN_NS;
    e->poll_ns = c->poll_ns;
    e->publish_ns = c->publish_ns;
    e->hold_ns = c->hold_ns;
    e->irq_fd = c->irq_fd;
    e->affinity_fd = c->affinity_fd;
    e->follow_mask = c->follow_mask;
    e->irq_cpu = -1;
    e->irq_request = (unsigned long)c->irq_request;
    e->irq_index = (uint32_t)c->irq_index;
    e->gate_fd = c->gate_fd;
    e->gate_mask = c->gate_mask;
    e->test_efault = c->test_efault;
    e->test_serial = c->test_serial;
    e->nowait = c->nowait;
    if (c->notify != Py_None) {
        Py_INCREF(c->notify);
        e->notify = c->notify;
    }
    if (c->on_error != Py_None) {
        Py_INCREF(c->on_error);
        e->on_error = c->on_error;
    }
    if (aio == AIO_URING && backend == BACKEND_FD) {
        int err = sb_uring_open(e);
        if (err < 0) {
            errno = -err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    e->ready = 1;
    return 0;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw)
{
    static char *names[] = {"config", NULL};
    PyObject *config;
    Config c = {0};
    int r;

    if (e->num) {
        PyErr_SetString(PyExc_RuntimeError, "engine is already initialised");
        return -1;
    }
    e->efd = e->gate_fd = -1;
    e->oldest = e->newest = -1;
    e->unpinnable = &e->own_unpinnable; /* unless the storage shares its byte */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:Engine", names, &config))
        return -1;
    r = read_config(config, &c);
    if (r == 0)
        r = engine_setup(e, &c);
    config_clear(&c); /* what the engine keeps, it holds itself (buffer views, references) */
    return r;
}

/* Let go of everything (driver memory, the disk, the log, the map, the capacity, the ring):
 * only with nothing in flight. The counters stay readable. */
static void release_all(Engine *e)
{
    RegionSet *rs = e->mem_cur;
    while (rs != NULL) {
        RegionSet *older = rs->older;
        sb_release_set(rs);
        rs = older;
    }
    e->mem_cur = NULL;
    if (e->cap_view.obj)
        PyBuffer_Release(&e->cap_view);
    if (e->link_view.obj)
        PyBuffer_Release(&e->link_view);
    e->link = NULL;
    free(e->rx_scratch);
    e->rx_scratch = NULL;
    if (e->mem_view.obj)
        PyBuffer_Release(&e->mem_view);
    if (e->log_view.obj)
        PyBuffer_Release(&e->log_view);
    if (e->unpin_view.obj)
        PyBuffer_Release(&e->unpin_view);
    e->unpinnable = &e->own_unpinnable; /* counters() still reads it */
    if (e->map_view.obj)
        PyBuffer_Release(&e->map_view);
    else
        PyMem_Free(e->map);
    e->map = NULL;
    e->desc = e->avail = e->used = NULL;
    e->capacity = NULL;
    e->mem = e->log = NULL;
    sb_uring_close(e);
    if (e->own_fd) {
        close(e->fd);
        e->own_fd = 0;
        e->fd = -1;
    }
    sb_nbd_release(e);
    PyMem_Free(e->nbd_ready);
    e->nbd_ready = NULL;
    if (e->reqs != NULL && e->nbd_holds == 0) {
        for (uint32_t k = 0; k < e->num; k++) {
            free(e->reqs[k].iov);
            free(e->reqs[k].buf);
        }
        PyMem_Free(e->reqs);
    } /* else libnbd still holds commands that write into them: leaked on purpose */
    e->reqs = NULL;
    PyMem_Free(e->batch);
    e->batch = NULL;
    free(e->sync_buf);
    e->sync_buf = NULL;
    free(e->gate_buf);
    e->gate_buf = NULL;
    e->bounce_retained = 0;
}

static void Engine_dealloc(Engine *e)
{
    if (e->ninflight == 0) {
        release_all(e);
    } else {
        /* Transfers may still be under way in the kernel (io-wq workers copying into our
         * address space, devices DMAing into pinned pages): freeing the memory they target
         * -- driver memory (the region buffers), our aligned buffers, their iovecs, the gate
         * bytes -- could let the kernel write into memory reused for something else. So all
         * of it, and the io_uring, is leaked on purpose. The owners of the leaked buffers
         * (mmaps of driver memory, the log) stay alive with them. Only an engine dropped
         * without wait_idle() gets here. */
    }
    Py_XDECREF(e->notify);
    Py_XDECREF(e->on_error);
    Py_XDECREF(e->on_unpinnable);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int usable(Engine *e, int abandoned_ok)
{
    if (e->running || e->closed || !e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running, closed or not initialised");
        return 0;
    }
    if (e->abandoned && !abandoned_ok) {
        PyErr_SetString(PyExc_RuntimeError, "engine was abandoned");
        return 0;
    }
    return 1;
}

/* run() or wait_idle() was cut short by a signal handler that raised (sb_signalled): raise
 * that exception now, as any blocking call does (1); the requests in flight stay, as after
 * a stop. */
static int raise_interrupted(Engine *e)
{
    if (!e->interrupted)
        return 0;
    e->interrupted = 0;
    PyErr_Restore(e->exc_type, e->exc_value, e->exc_tb);
    e->exc_type = e->exc_value = e->exc_tb = NULL;
    return 1;
}

static PyObject *Engine_run(Engine *e, PyObject *args)
{
    int kick_fd, stop_fd, r;
    if (!PyArg_ParseTuple(args, "ii", &kick_fd, &stop_fd))
        return NULL;
    if (!usable(e, 0))
        return NULL;
    e->running = 1;
    if (e->log != NULL)
        e->seq = ld64(e->log + LOG_SEQ); /* the Python path may have taken requests meanwhile */
    sb_run_start(e, !e->deferred);
    e->ts = PyEval_SaveThread();
    r = sb_run(e, kick_fd, stop_fd);
    PyEval_RestoreThread(e->ts);
    e->ts = NULL;
    e->running = 0;
    e->deferred = r == RUN_DEFER;
    sb_collect_sets(e);
    if (raise_interrupted(e))
        return NULL;
    return PyLong_FromLong(r);
}

static PyObject *Engine_wait_idle(Engine *e, PyObject *arg)
{
    unsigned long long timeout = PyLong_AsUnsignedLongLong(arg);
    uint64_t left;
    if (timeout == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (e->closed && e->ninflight == 0)
        return PyLong_FromLong(0);
    if (!usable(e, 1))
        return NULL;
    e->running = 1;
    e->ts = PyEval_SaveThread();
    left = sb_wait_idle(e, timeout);
    PyEval_RestoreThread(e->ts);
    e->ts = NULL;
    e->running = 0;
    sb_collect_sets(e);
    if (raise_interrupted(e))
        return NULL;
    return PyLong_FromUnsignedLongLong(left);
}

static PyObject *Engine_abandon(Engine *e, PyObject *unused)
{
    if (e->closed)
        Py_RETURN_NONE;
    if (!usable(e, 1))
        return NULL;
    if (!e->abandoned) {
        e->abandoned = 1;
        sb_nbd_fail_parked(e, 1); /* dropped: they were never sent again */
        if (e->nasync && e->backend != BACKEND_NBD)
            sb_uring_cancel_all(e);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_poison_in_flight(Engine *e, PyObject *unused)
{
    /* Safe while run() serves: requests are numbered as they are taken. */
    __atomic_store_n(&e->poison_mark, __atomic_load_n(&e->taken, __ATOMIC_RELAXED),
                     __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Engine_in_flight(Engine *e, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(e->ninflight);
}

static PyObject *Engine_close(Engine *e, PyObject *unused)
{
    if (e->running) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running");
        return NULL;
    }
    if (e->ninflight) {
        PyErr_Format(PyExc_RuntimeError,
                     "%llu requests in flight: wait_idle() (or abandon() and wait_idle()) first",
                     (unsigned long long)e->ninflight);
        return NULL;
    }
    release_all(e);
    e->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_request_stop(Engine *e, PyObject *unused)
{
    __atomic_store_n(&e->stop, 1, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* A pause (a memory remap) returns from run() as a stop does, but is undone by resume(). */
static PyObject *Engine_request_pause(Engine *e, PyObject *unused)
{
    __atomic_store_n(&e->pause, 1, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Engine_resume(Engine *e, PyObject *unused)
{
    __atomic_store_n(&e->pause, 0, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_regions(Engine *e, PyObject *regions)
{
    RegionSet *old, *rs;
    if (e->running || e->closed || !e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running, closed or not initialised");
        return NULL;
    }
    if ((rs = sb_load_regions(regions)) == NULL)
        return NULL;
    old = e->mem_cur;
    rs->older = old;
    e->mem_cur = rs;
    if (sb_map_ring(e) < 0) { /* keep serving from the old map */
        e->mem_cur = old;
        rs->older = NULL;
        sb_release_set(rs);
        old->hit = -1;
        (void)sb_map_ring(e); /* as it was: this map held the ring before */
        return NULL;
    }
    sb_collect_sets(e); /* the old set now, unless requests in flight use it */
    Py_RETURN_NONE;
}

/* A new NBD connection (the binding's NBD object; None: none yet): the requests parked on
 * the lost one are sent on it (and park again if it is lost too). */
static PyObject *Engine_set_nbd(Engine *e, PyObject *capsule)
{
    if (e->running || e->closed || !e->ready || e->backend != BACKEND_NBD) {
        PyErr_SetString(PyExc_RuntimeError,
                        "engine is running, closed, not initialised or not an NBD engine");
        return NULL;
    }
    if (sb_nbd_set(e, capsule) < 0)
        return NULL;
    if (!e->abandoned)
        sb_nbd_resend(e);
    sb_publish(e);
    Py_RETURN_NONE;
}

/* No connection came back in time: the parked requests fail with IOERR. */
static PyObject *Engine_fail_parked(Engine *e, PyObject *unused)
{
    if (e->running || e->closed || !e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running, closed or not initialised");
        return NULL;
    }
    sb_nbd_fail_parked(e, 0);
    sb_publish(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_get_parked(Engine *e, void *closure)
{
    return PyLong_FromUnsignedLongLong(e->nparked);
}

static PyObject *Engine_position(Engine *e, PyObject *unused)
{
    return Py_BuildValue("HHHKH", e->last_avail, e->used_idx, e->signalled,
                         (unsigned long long)e->seq, e->avail_seen);
}

static PyObject *Engine_set_position(Engine *e, PyObject *args)
{
    unsigned short last_avail, used_idx, signalled, seen;
    if (e->running || !e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running or not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "HHH|H", &last_avail, &used_idx, &signalled, &seen))
        return NULL;
    if (PyTuple_GET_SIZE(args) < 4 || (uint16_t)(seen - last_avail) > e->num)
        seen = last_avail; /* read avail->idx again before taking anything */
    e->last_avail = last_avail;
    e->avail_seen = seen;
    e->used_idx = used_idx;
    e->signalled = signalled;
    Py_RETURN_NONE;
}

static PyObject *hist_list(const uint64_t *h)
{
    PyObject *list = PyList_New(HIST_BUCKETS);
    if (list == NULL)
        return NULL;
    for (int k = 0; k < HIST_BUCKETS; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(h[k]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, v);
    }
    return list;
}

static PyObject *Engine_counters(Engine *e, PyObject *unused)
{
    PyObject *hist = hist_list(e->hist), *depth = hist_list(e->depth_hist);
    if (hist == NULL || depth == NULL) {
        Py_XDECREF(hist);
        Py_XDECREF(depth);
        return NULL;
    }
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:N,s:{s:K,s:K,s:K,s:K},s:K,s:K,s:K,s:K,s:N,s:K,s:K,s:K,s:K,s:K,s:i,s:K,s:K,"
        "s:{s:K,s:K,s:K,s:K},s:K,s:K,s:K,s:K,s:K}",
        "started", (unsigned long long)e->started, "completed",
        (unsigned long long)e->completed, "latency_ns", (unsigned long long)e->latency_ns,
        "latency", hist, "by_type", "0", (unsigned long long)e->n_in, "1",
        (unsigned long long)e->n_out, "4", (unsigned long long)e->n_flush, "8",
        (unsigned long long)e->n_get_id, "errors", (unsigned long long)e->errors,
        "bytes_read", (unsigned long long)e->bytes_read, "bytes_written",
        (unsigned long long)e->bytes_written, "in_flight", (unsigned long long)e->ninflight,
        "depth_hist", depth, "depth_sum", (unsigned long long)e->depth_sum, "taken",
        (unsigned long long)e->taken, "oldest_taken",
        (unsigned long long)e->oldest_taken, "bounced", (unsigned long long)e->bounced,
        "efaults", (unsigned long long)e->efaults, "bounce_all", sb_copying(e), "inline",
        (unsigned long long)e->inline_done, "budget_sleeps",
        (unsigned long long)e->budget_sleeps, "net", "packets",
        (unsigned long long)e->net_packets, "bytes", (unsigned long long)e->net_bytes, "drops",
        (unsigned long long)e->net_drops, "errors", (unsigned long long)e->net_errors,
        "bounce_peak", (unsigned long long)e->bounce_peak, "nbd_holds",
        (unsigned long long)e->nbd_holds, "nbd_ok", (unsigned long long)e->nbd_ok, "nbd_kills",
        (unsigned long long)e->nbd_kills, "budget_backoff_max_ns",
        (unsigned long long)e->backoff_max_ns);
}

static PyObject *Engine_get_started(Engine *e, void *closure)
{
    return PyLong_FromUnsignedLongLong(e->started);
}

static PyObject *Engine_get_aio(Engine *e, void *closure)
{
    if (e->backend == BACKEND_NBD)
        return PyLong_FromLong(AIO_NBD);
    return PyLong_FromLong(e->ring_ok ? AIO_URING : AIO_SYNC);
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_VARARGS,
     "run(kick_fd, stop_fd) -> 0 stopped, 1 the next chain is for the Python path, "
     "3 the NBD connection is lost (requests parked)"},
    {"wait_idle", (PyCFunction)Engine_wait_idle, METH_O,
     "wait_idle(timeout_ns) -> requests still in flight (when run() is not running)"},
    {"abandon", (PyCFunction)Engine_abandon, METH_NOARGS,
     "never write driver memory, the log or the map again; drop what still completes"},
    {"poison_in_flight", (PyCFunction)Engine_poison_in_flight, METH_NOARGS,
     "the requests in flight now complete with IOERR whatever the backend does"},
    {"in_flight", (PyCFunction)Engine_in_flight, METH_NOARGS,
     "requests taken and not yet completed"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     "release driver memory, the disk and the log (after run() returned for good)"},
    {"request_stop", (PyCFunction)Engine_request_stop, METH_NOARGS,
     "make run() return at the next request (also write stop_fd to wake it)"},
    {"request_pause", (PyCFunction)Engine_request_pause, METH_NOARGS,
     "make run() return at the next request until resume() (also write stop_fd)"},
    {"resume", (PyCFunction)Engine_resume, METH_NOARGS, "undo request_pause()"},
    {"set_regions", (PyCFunction)Engine_set_regions, METH_O,
     "replace the driver-memory regions (after the Python path faulted new ones in)"},
    {"position", (PyCFunction)Engine_position, METH_NOARGS,
     "(last_avail, used_idx, signalled_used, log_seq, avail_seen)"},
    {"set_position", (PyCFunction)Engine_set_position, METH_VARARGS,
     "set_position(last_avail, used_idx, signalled_used[, avail_seen])"},
    {"counters", (PyCFunction)Engine_counters, METH_NOARGS, "the counters as a dict"},
    {"set_nbd", (PyCFunction)Engine_set_nbd, METH_O,
     "set_nbd(NBD handle or None): a new NBD connection; parked requests are sent on it"},
    {"fail_parked", (PyCFunction)Engine_fail_parked, METH_NOARGS,
     "the requests parked for a lost NBD connection fail with IOERR"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"started", (getter)Engine_get_started, NULL,
     "monotonic ns when the oldest request in flight was taken, 0 if none", NULL},
    {"aio", (getter)Engine_get_aio, NULL,
     "AIO_NBD for an NBD engine, AIO_URING when requests go to io_uring, else AIO_SYNC", NULL},
    {"parked", (getter)Engine_get_parked, NULL,
     "NBD requests waiting for a connection", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pyvduse.fastpath." SB_MODULE ".Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One virtio-blk or virtio-net split virtqueue served in C (see pyvduse.fastpath).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, SB_MODULE, "The native virtio-blk split-ring data path.", -1, NULL,
};

PyMODINIT_FUNC SB_INIT(void)
{
    PyObject *m;
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "RUN_STOPPED", RUN_STOPPED);
    PyModule_AddIntConstant(m, "RUN_DEFER", RUN_DEFER);
    PyModule_AddIntConstant(m, "RUN_NBD_LOST", RUN_NBD_LOST);
    PyModule_AddIntConstant(m, "BACKEND_NBD", BACKEND_NBD);
    PyModule_AddIntConstant(m, "AIO_NBD", AIO_NBD);
    PyModule_AddIntConstant(m, "BACKEND_NULL", BACKEND_NULL);
    PyModule_AddIntConstant(m, "BACKEND_FD", BACKEND_FD);
    PyModule_AddIntConstant(m, "BACKEND_MEMORY", BACKEND_MEMORY);
    PyModule_AddIntConstant(m, "BACKEND_TAP", BACKEND_TAP);
    PyModule_AddIntConstant(m, "DEV_BLK", DEV_BLK);
    PyModule_AddIntConstant(m, "DEV_NET_RX", DEV_NET_RX);
    PyModule_AddIntConstant(m, "DEV_NET_TX", DEV_NET_TX);
    PyModule_AddIntConstant(m, "AIO_SYNC", AIO_SYNC);
    PyModule_AddIntConstant(m, "AIO_URING", AIO_URING);
#ifdef SB_URING
    PyModule_AddIntConstant(m, "HAS_URING", 1);
#else
    PyModule_AddIntConstant(m, "HAS_URING", 0);
#endif
#ifdef SB_NBD
    PyModule_AddIntConstant(m, "HAS_NBD", 1);
#else
    PyModule_AddIntConstant(m, "HAS_NBD", 0);
#endif
    return m;
}
