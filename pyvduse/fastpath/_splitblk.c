/*
 * The optional native data path: one virtio-blk split virtqueue served in C.
 *
 * Why: under emulation the Python queue worker costs ~750 us of CPU per request, most of it
 * spread thinly over the interpreter (see README, Performance). This loop does the same
 * steps as pyvduse.runtime.worker + ring.split + ring.inflight + device.blk for the common
 * requests (IN, OUT, FLUSH, GET_ID) with the GIL released, so queues also run in parallel.
 *
 * It is deliberately conservative: anything it does not fully like -- a chain that is
 * malformed, names memory outside the regions it was given, holds too many segments, a
 * request type other than the four, an avail index that ran away, a head out of range --
 * it leaves untaken and returns DEFER, and the Python path (the reference, with its own
 * validation, logging and fault-in of new IOTLB regions) takes exactly that chain. So the
 * hostile-ring guarantees are those of the Python engine, and every byte of driver memory
 * this file touches was checked against a region first.
 *
 * Layouts (all little-endian, virtio 1.2 section 2.7): descriptor {u64 addr, u32 len,
 * u16 flags, u16 next}; avail {u16 flags, u16 idx, u16 ring[num], u16 used_event}; used
 * {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}. The in-flight log is the
 * one of pyvduse/ring/inflight.py: header {u16 last_avail, u16 base, u32 num, u64 seq},
 * then per head {u8 state, 7 pad, u64 seq}.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_BARRIER 0x80000000u
#define S_OK 0
#define S_IOERR 1
#define ID_BYTES 20
#define OUTHDR_SIZE 16

#define LOG_HEADER 16
#define LOG_ENTRY 16
#define LOG_FREE 0
#define LOG_IN_FLIGHT 1
#define LOG_COMPLETED 2

#define MAX_SEGS 1024 /* per direction; more goes to the Python path, which splits */
#define HIST_BUCKETS 64

enum { RUN_STOPPED = 0, RUN_DEFER = 1 };
enum { BACKEND_NULL = 0, BACKEND_FD = 1, BACKEND_MEMORY = 2 };

typedef struct {
    uint64_t start, last;
    uint8_t *base;
    int writable;
} Region;

typedef struct {
    PyObject_HEAD
    /* driver memory: regions as given, with the buffers that keep them alive */
    Region *regions;
    Py_buffer *views;
    int nregions;
    int hit;
    /* the ring */
    uint32_t num;
    uint8_t *desc, *avail, *used;
    uint64_t desc_iova, avail_iova, used_iova;
    int event_idx, indirect;
    uint16_t last_avail, avail_seen, used_idx, signalled;
    /* the in-flight log (optional) */
    Py_buffer log_view;
    uint8_t *log;
    uint64_t seq;
    uint16_t *batch;
    uint32_t nbatch;
    /* the device */
    int backend, fd, readonly;
    Py_buffer mem_view;
    uint8_t *mem;
    uint64_t mem_size;
    Py_buffer cap_view;
    volatile uint64_t *capacity;
    uint8_t serial[ID_BYTES];
    /* interrupts and errors */
    int irq_fd;
    unsigned long irq_request;
    uint32_t irq_index;
    int affinity_fd; /* vqN/irq_cb_affinity, written so interrupts follow us; -1: leave it */
    uint64_t follow_mask; /* ... when we run on one of these CPUs */
    int irq_cpu;     /* the CPU last written there */
    PyObject *notify, *on_error;
    PyThreadState *ts; /* while run() has released the GIL */
    /* control */
    uint64_t poll_ns; /* after the ring empties, poll it this long before sleeping */
    uint64_t publish_ns; /* publish a round's completions after a request this long */
    uint64_t hold_ns;    /* ... or once the oldest is this old */
    volatile int stop;
    int running, closed;
    /* counters, written by the serving thread only */
    volatile uint64_t started;
    uint64_t completed, latency_ns, hist[HIST_BUCKETS];
    uint64_t n_in, n_out, n_flush, n_get_id, errors, bytes_read, bytes_written;
    /* scratch */
    struct iovec rd[MAX_SEGS], wr[MAX_SEGS];
    int nrd, nwr;
} Engine;

/* -- little helpers ------------------------------------------------------------------- */

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }
static inline void st16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static inline uint16_t ld16_acquire(const uint8_t *p)
{
    uint16_t v = __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    return le16toh(v);
}

static inline void st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELEASE);
}

static inline uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline int bit_length(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

/* -- driver memory -------------------------------------------------------------------- */

static Region *find_region(Engine *e, uint64_t iova)
{
    Region *r;
    int lo = 0, hi = e->nregions - 1;
    if (e->hit >= 0) {
        r = &e->regions[e->hit];
        if (r->start <= iova && iova <= r->last)
            return r;
    }
    while (lo <= hi) { /* regions are sorted and disjoint */
        int mid = (lo + hi) / 2;
        r = &e->regions[mid];
        if (iova < r->start)
            hi = mid - 1;
        else if (iova > r->last)
            lo = mid + 1;
        else {
            e->hit = mid;
            return r;
        }
    }
    return NULL;
}

/* A pointer to [iova, iova+len) inside one region, or NULL. */
static uint8_t *contiguous(Engine *e, uint64_t iova, uint64_t len, int write)
{
    Region *r;
    if (len == 0 || iova > UINT64_MAX - (len - 1))
        return NULL;
    r = find_region(e, iova);
    if (r == NULL || (write && !r->writable) || iova + (len - 1) > r->last)
        return NULL;
    return r->base + (iova - r->start);
}

/* Append the local segments of [iova, iova+len) to iov; -1 if any byte is not mapped. */
static int add_segments(Engine *e, uint64_t iova, uint32_t len, int write, struct iovec *iov,
                        int *n)
{
    uint64_t pos = iova, rem = len;
    if (len && iova > UINT64_MAX - (len - 1))
        return -1;
    while (rem) {
        Region *r = find_region(e, pos);
        uint64_t room, take;
        if (r == NULL || (write && !r->writable) || *n >= MAX_SEGS)
            return -1;
        room = r->last - pos; /* bytes after pos in this region */
        take = rem - 1 <= room ? rem : room + 1;
        iov[*n].iov_base = r->base + (pos - r->start);
        iov[*n].iov_len = take;
        (*n)++;
        rem -= take;
        pos += take;
    }
    return 0;
}

/* -- the chain ------------------------------------------------------------------------ */

static int add_desc(Engine *e, uint64_t addr, uint32_t len, uint16_t flags)
{
    if (flags & DESC_F_WRITE)
        return add_segments(e, addr, len, 1, e->wr, &e->nwr);
    if (e->nwr) /* readable after writable */
        return -1;
    return add_segments(e, addr, len, 0, e->rd, &e->nrd);
}

/* Walk the chain at head into e->rd / e->wr; -1: leave it to the Python path. */
static int walk(Engine *e, uint16_t head)
{
    uint32_t i = head, count = 0;
    e->nrd = e->nwr = 0;
    for (;;) {
        const uint8_t *d;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        if (++count > e->num)
            return -1;
        d = e->desc + 16u * i;
        addr = ld64(d);
        len = ld32(d + 8);
        flags = ld16(d + 12);
        next = ld16(d + 14);
        if (flags & DESC_F_INDIRECT) {
            const uint8_t *table;
            uint32_t n, j = 0, budget = e->num - count + 1, used = 0;
            if (!e->indirect || (flags & DESC_F_NEXT) || len == 0 || len % 16 ||
                len / 16 > e->num)
                return -1;
            table = contiguous(e, addr, len, 0);
            if (table == NULL)
                return -1;
            n = len / 16;
            for (;;) {
                const uint8_t *t;
                uint64_t taddr;
                uint32_t tlen;
                uint16_t tflags, tnext;
                if (++used > budget)
                    return -1;
                t = table + 16u * j;
                taddr = ld64(t);
                tlen = ld32(t + 8);
                tflags = ld16(t + 12);
                tnext = ld16(t + 14);
                if (tflags & DESC_F_INDIRECT)
                    return -1;
                if (tlen && add_desc(e, taddr, tlen, tflags) < 0)
                    return -1;
                if (!(tflags & DESC_F_NEXT))
                    return 0;
                if (tnext >= n)
                    return -1;
                j = tnext;
            }
        }
        /* As the Python engine: a direct readable descriptor after a writable one is
         * refused even when empty (inside indirect tables empty ones are skipped). */
        if (!(flags & DESC_F_WRITE) && e->nwr)
            return -1;
        if (len && add_desc(e, addr, len, flags) < 0)
            return -1;
        if (!(flags & DESC_F_NEXT))
            return 0;
        if (next >= e->num)
            return -1;
        i = next;
    }
}

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int k = 0; k < n; k++)
        t += iov[k].iov_len;
    return t;
}

/* The segments covering bytes [off, off+len) of iov, into out (at most n of them). */
static int iov_slice(const struct iovec *iov, int n, uint64_t off, uint64_t len,
                     struct iovec *out)
{
    int m = 0;
    for (int k = 0; k < n && len; k++) {
        size_t l = iov[k].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t take = l - off < len ? l - off : len;
        out[m].iov_base = (uint8_t *)iov[k].iov_base + off;
        out[m].iov_len = take;
        m++;
        len -= take;
        off = 0;
    }
    return m;
}

/* Copy the first OUTHDR_SIZE bytes of the concatenation of iov into out (which holds them). */
static void gather_header(const struct iovec *iov, int n, uint8_t *out)
{
    struct iovec parts[OUTHDR_SIZE]; /* every segment holds at least one byte */
    int m = iov_slice(iov, n < OUTHDR_SIZE ? n : OUTHDR_SIZE, 0, OUTHDR_SIZE, parts);
    for (int k = 0; k < m; k++) {
        memcpy(out, parts[k].iov_base, parts[k].iov_len);
        out += parts[k].iov_len;
    }
}

/* -- the backend ---------------------------------------------------------------------- */

/* preadv/pwritev the whole of iov at off; short transfers continue, EOF reads zeroes. */
static int fd_transfer(int fd, struct iovec *iov, int n, uint64_t off, int write)
{
    while (n > 0) {
        ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0) {
            if (write)
                return EIO;
            for (int k = 0; k < n; k++) /* past the end of the file */
                memset(iov[k].iov_base, 0, iov[k].iov_len);
            return 0;
        }
        off += (uint64_t)r;
        while (n > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0 && r) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* Move data between the backend at off and iov; 0 or an errno. */
static int backend_io(Engine *e, struct iovec *iov, int n, uint64_t off, uint64_t len, int write)
{
    switch (e->backend) {
    case BACKEND_NULL:
        if (!write)
            for (int k = 0; k < n; k++)
                memset(iov[k].iov_base, 0, iov[k].iov_len);
        return 0;
    case BACKEND_MEMORY:
        if (off > e->mem_size || len > e->mem_size - off)
            return EIO;
        for (int k = 0; k < n; k++) {
            if (write)
                memcpy(e->mem + off, iov[k].iov_base, iov[k].iov_len);
            else
                memcpy(iov[k].iov_base, e->mem + off, iov[k].iov_len);
            off += iov[k].iov_len;
        }
        return 0;
    default:
        return fd_transfer(e->fd, iov, n, off, write);
    }
}

static int in_range(Engine *e, uint64_t sector, uint64_t len)
{
    uint64_t cap = *e->capacity, off;
    if (sector > (UINT64_MAX >> 9))
        return 0;
    off = sector << 9;
    return off <= cap && len <= cap - off;
}

/* Calls back into Python with the GIL: for the rare paths only. */
static void report_error(Engine *e, uint32_t rtype, uint64_t sector, int err)
{
    PyObject *res;
    if (e->on_error == NULL)
        return;
    PyEval_RestoreThread(e->ts);
    res = PyObject_CallFunction(e->on_error, "IKi", rtype, (unsigned long long)sector, err);
    if (res == NULL)
        PyErr_WriteUnraisable(e->on_error);
    Py_XDECREF(res);
    e->ts = PyEval_SaveThread();
}

/* Serve one parsed request; returns the used length (data written + the status byte). */
static uint32_t serve(Engine *e, uint32_t rtype, uint64_t sector, uint8_t *status)
{
    struct iovec data[MAX_SEGS];
    uint64_t in_len = iov_total(e->wr, e->nwr) - 1;
    uint8_t st = S_OK;
    uint32_t written = 0;
    int n, err = 0;

    switch (rtype) {
    case T_IN:
        e->n_in++;
        if (!in_range(e, sector, in_len)) {
            st = S_IOERR;
            break;
        }
        n = iov_slice(e->wr, e->nwr, 0, in_len, data);
        if (in_len && (err = backend_io(e, data, n, sector << 9, in_len, 0)) != 0) {
            st = S_IOERR;
            break;
        }
        e->bytes_read += in_len;
        written = (uint32_t)in_len;
        break;
    case T_OUT: {
        uint64_t out_len = iov_total(e->rd, e->nrd) - OUTHDR_SIZE;
        e->n_out++;
        if (e->readonly || !in_range(e, sector, out_len)) {
            st = S_IOERR;
            break;
        }
        n = iov_slice(e->rd, e->nrd, OUTHDR_SIZE, out_len, data);
        if (out_len && (err = backend_io(e, data, n, sector << 9, out_len, 1)) != 0) {
            st = S_IOERR;
            break;
        }
        e->bytes_written += out_len;
        break;
    }
    case T_FLUSH:
        e->n_flush++;
        if (!e->readonly && e->backend == BACKEND_FD) {
            while (fdatasync(e->fd) < 0) {
                if (errno != EINTR) {
                    err = errno;
                    st = S_IOERR;
                    break;
                }
            }
        }
        break;
    default: { /* T_GET_ID */
        uint64_t want = in_len < ID_BYTES ? in_len : ID_BYTES;
        size_t pos = 0;
        e->n_get_id++;
        n = iov_slice(e->wr, e->nwr, 0, want, data);
        for (int k = 0; k < n; k++) {
            memcpy(data[k].iov_base, e->serial + pos, data[k].iov_len);
            pos += data[k].iov_len;
        }
        written = (uint32_t)want;
        break;
    }
    }
    if (err)
        report_error(e, rtype, sector, err);
    if (st != S_OK)
        e->errors++;
    *status = st;
    return written + 1;
}

/* -- the ring and the log ------------------------------------------------------------- */

static inline uint8_t *log_entry(Engine *e, uint16_t head) { return e->log + LOG_HEADER + LOG_ENTRY * head; }

static void log_taken(Engine *e, uint16_t head)
{
    uint8_t *ent;
    if (e->log == NULL)
        return;
    e->seq++;
    ent = log_entry(e, head);
    ent[0] = LOG_IN_FLIGHT;
    st64(ent + 8, e->seq);
    st16(e->log, e->last_avail);
    st64(e->log + 8, e->seq);
}

static void push(Engine *e, uint16_t head, uint32_t written)
{
    uint8_t *elem = e->used + 4 + 8u * (e->used_idx % e->num);
    if (e->log != NULL) {
        if (e->nbatch == 0)
            st16(e->log + 2, e->used_idx); /* the batch's base */
        log_entry(e, head)[0] = LOG_COMPLETED;
        e->batch[e->nbatch++] = head;
    }
    st32(elem, head);
    st32(elem + 4, written);
    e->used_idx++;
}

static void interrupt(Engine *e)
{
    if (e->irq_fd >= 0) {
        uint32_t index = e->irq_index;
        (void)ioctl(e->irq_fd, e->irq_request, &index); /* EINVAL while resetting: fine */
    } else if (e->notify != NULL) {
        PyObject *res;
        PyEval_RestoreThread(e->ts);
        res = PyObject_CallFunction(e->notify, "I", e->irq_index);
        if (res == NULL)
            PyErr_WriteUnraisable(e->notify);
        Py_XDECREF(res);
        e->ts = PyEval_SaveThread();
    }
}

/* --irq-cpus follow: point the queue's interrupt work at the CPU this loop runs on (one of
 * the driver's for this queue), so that it lands where the device's own work does and not on
 * the application's CPU. Written only when the scheduler moved us; a write the kernel refuses
 * stops the following. */
static void follow_cpu(Engine *e)
{
    char text[32];
    int cpu, n;
    if (e->affinity_fd < 0 || (cpu = sched_getcpu()) < 0 || cpu == e->irq_cpu || cpu >= 64 ||
        !(e->follow_mask >> cpu & 1))
        return;
    n = snprintf(text, sizeof text, "%x", 1u << (cpu % 32)); /* the kernel's cpumask text */
    if (cpu >= 32)
        n += snprintf(text + n, sizeof text - n, ",00000000");
    if (pwrite(e->affinity_fd, text, (size_t)n, 0) == n)
        e->irq_cpu = cpu;
    else
        e->affinity_fd = -1; /* the fd stays the caller's to close */
}

/* Make pushed completions visible, free their log entries, interrupt if the driver asked. */
static void publish(Engine *e)
{
    uint16_t new_idx = e->used_idx, old = e->signalled;
    int need;
    st16_release(e->used + 2, new_idx);
    for (uint32_t k = 0; k < e->nbatch; k++)
        log_entry(e, e->batch[k])[0] = LOG_FREE;
    e->nbatch = 0;
    if (new_idx == old)
        return;
    e->signalled = new_idx;
    if (e->event_idx) {
        uint16_t ev;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ev = ld16_acquire(e->avail + 4 + 2 * e->num);
        need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        need = !(ld16_acquire(e->avail) & AVAIL_F_NO_INTERRUPT);
    }
    if (need)
        interrupt(e);
}

/* Chains made available and not taken; -1 when the index ran away (the Python path breaks
 * the queue with the message). */
static int pending(Engine *e)
{
    uint16_t seen = ld16_acquire(e->avail + 2);
    uint16_t n = (uint16_t)(seen - e->last_avail);
    if (n > e->num)
        return -1;
    e->avail_seen = seen;
    return n;
}

static void disable_kicks(Engine *e)
{
    if (!e->event_idx)
        st16(e->used, USED_F_NO_NOTIFY);
}

static int enable_kicks(Engine *e)
{
    if (e->event_idx)
        st16(e->used + 4 + 8 * e->num, e->last_avail);
    else
        st16(e->used, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return pending(e);
}

/* Take the next chain if this path can serve it: 1 taken (head, type, sector, status set),
 * 0 ring empty, -1 leave it to Python. Nothing changes unless it returns 1. */
static int take(Engine *e, uint16_t *head, uint32_t *rtype, uint64_t *sector, uint8_t **status)
{
    uint8_t hdr[OUTHDR_SIZE];
    struct iovec *last;
    uint32_t t;
    uint16_t h;
    if (e->last_avail == e->avail_seen) {
        int p = pending(e);
        if (p <= 0)
            return p;
    }
    h = ld16(e->avail + 4 + 2 * (e->last_avail % e->num));
    if (h >= e->num || walk(e, h) < 0 || e->nwr == 0 || e->nrd == 0 ||
        iov_total(e->rd, e->nrd) < OUTHDR_SIZE)
        return -1;
    gather_header(e->rd, e->nrd, hdr);
    t = ld32(hdr) & ~T_BARRIER;
    if (t != T_IN && t != T_OUT && t != T_FLUSH && t != T_GET_ID)
        return -1;
    last = &e->wr[e->nwr - 1];
    *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    *head = h;
    *rtype = t;
    *sector = ld64(hdr + 8);
    e->last_avail++;
    log_taken(e, h);
    return 1;
}

/* With kicks still off, watch the avail index for up to poll_ns: 1 when the driver made
 * more available (serve it with no kick and no wake-up), 0 when the time ran out. */
static int poll_for_work(Engine *e)
{
    uint64_t deadline = now_ns() + e->poll_ns;
    for (unsigned spins = 0;; spins++) {
        if (ld16_acquire(e->avail + 2) != e->last_avail)
            return 1;
        if (e->stop)
            return 0;
        if ((spins & 63) == 63 && now_ns() >= deadline)
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

/* Serve until the ring is empty with kicks re-enabled (RUN_STOPPED is not returned then:
 * 2 means "sleep"), a stop is asked, or a chain is left to Python. */
#define DRAIN_SLEEP 2
static int drain(Engine *e)
{
    for (;;) {
        uint32_t n = 0;
        uint64_t t, start;
        int r = 0;
        uint64_t published;
        disable_kicks(e);
        t = start = published = now_ns();
        while (n < e->num) {
            uint16_t head;
            uint32_t rtype;
            uint64_t sector, done, took;
            uint8_t *status;
            if (e->stop) {
                r = RUN_STOPPED;
                break;
            }
            r = take(e, &head, &rtype, &sector, &status);
            if (r <= 0) {
                r = r < 0 ? RUN_DEFER : DRAIN_SLEEP;
                break;
            }
            e->started = t;
            push(e, head, serve(e, rtype, sector, status));
            done = now_ns();
            e->started = 0;
            took = done - t;
            e->hist[bit_length(took / 1000) & (HIST_BUCKETS - 1)]++;
            t = done;
            n++;
            r = DRAIN_SLEEP;
            if (took >= e->publish_ns || done - published >= e->hold_ns) {
                publish(e);
                published = done;
            }
        }
        e->latency_ns += t - start;
        e->completed += n;
        publish(e);
        if (r != DRAIN_SLEEP)
            return r;
        if (n < e->num) {
            int p;
            if (e->poll_ns && poll_for_work(e))
                continue;
            p = enable_kicks(e);
            if (p < 0)
                return RUN_DEFER;
            if (p == 0)
                return DRAIN_SLEEP;
        }
    }
}

/* -- the Python object ---------------------------------------------------------------- */

static void release_regions(Engine *e)
{
    for (int k = 0; k < e->nregions; k++)
        PyBuffer_Release(&e->views[k]);
    PyMem_Free(e->regions);
    PyMem_Free(e->views);
    e->regions = NULL;
    e->views = NULL;
    e->nregions = 0;
    e->hit = -1;
}

/* regions: a sequence of (start, last, buffer, writable), sorted and disjoint. */
static int load_regions(Engine *e, PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "regions must be a sequence");
    Py_ssize_t n;
    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    release_regions(e);
    e->regions = PyMem_Calloc(n ? n : 1, sizeof(Region));
    e->views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (e->regions == NULL || e->views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, k), *buf;
        unsigned long long start, last;
        int writable;
        Region *r = &e->regions[k];
        if (!PyArg_ParseTuple(item, "KKOp", &start, &last, &buf, &writable))
            goto fail;
        if (PyObject_GetBuffer(buf, &e->views[k], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            goto fail;
        e->nregions = (int)k + 1;
        if (last < start || (unsigned long long)e->views[k].len != last - start + 1 ||
            (k > 0 && start <= e->regions[k - 1].last)) {
            PyErr_SetString(PyExc_ValueError, "regions must be sorted, disjoint and match their buffers");
            goto fail;
        }
        r->start = start;
        r->last = last;
        r->base = e->views[k].buf;
        r->writable = writable;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    release_regions(e);
    return -1;
}

/* Point at the ring's three parts inside the current regions (sizes as in virtio 1.2
 * 2.7.6 and 2.7.8: the event-idx fields only when negotiated). */
static int map_ring(Engine *e)
{
    uint64_t extra = e->event_idx ? 2 : 0;
    e->desc = contiguous(e, e->desc_iova, 16ull * e->num, 0);
    e->avail = contiguous(e, e->avail_iova, 4 + 2ull * e->num + extra, 0);
    e->used = contiguous(e, e->used_iova, 4 + 8ull * e->num + extra, 1);
    if (e->desc == NULL || e->avail == NULL || e->used == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring not inside the regions given");
        return -1;
    }
    return 0;
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

static int Engine_init(Engine *e, PyObject *args, PyObject *kw)
{
    static char *names[] = {"regions", "num", "desc", "avail", "used", "event_idx", "indirect",
                            "last_avail", "used_idx", "signalled", "capacity", "readonly",
                            "serial", "backend", "fd", "memory", "log", "irq_fd",
                            "irq_request", "irq_index", "notify", "on_error", "poll_ns",
                            "publish_ns", "hold_ns", "affinity_fd", "follow_mask", NULL};
    PyObject *regions, *capacity, *memory = Py_None, *log = Py_None, *notify = Py_None,
             *on_error = Py_None;
    unsigned long long desc, avail, used;
    unsigned int num, irq_index = 0;
    unsigned short last_avail, used_idx, signalled;
    unsigned long irq_request = 0;
    unsigned long long poll_ns = 0, publish_ns = ULLONG_MAX, hold_ns = ULLONG_MAX,
                       follow_mask = 0;
    int event_idx, indirect, readonly, backend, fd = -1, irq_fd = -1, affinity_fd = -1;
    const char *serial;
    Py_ssize_t serial_len;

    if (e->num) {
        PyErr_SetString(PyExc_RuntimeError, "engine is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OIKKKppHHHOpy#i|iOOikIOOKKKiK", names, &regions,
                                     &num, &desc, &avail, &used, &event_idx, &indirect,
                                     &last_avail, &used_idx, &signalled, &capacity, &readonly,
                                     &serial, &serial_len, &backend, &fd, &memory, &log,
                                     &irq_fd, &irq_request, &irq_index, &notify, &on_error,
                                     &poll_ns, &publish_ns, &hold_ns, &affinity_fd,
                                     &follow_mask))
        return -1;
    if (num == 0 || num > 32768 || (num & (num - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two up to 32768");
        return -1;
    }
    if (backend < BACKEND_NULL || backend > BACKEND_MEMORY || serial_len > ID_BYTES) {
        PyErr_SetString(PyExc_ValueError, "bad backend or serial");
        return -1;
    }
    e->hit = -1;
    if (load_regions(e, regions) < 0)
        return -1;
    e->num = num;
    e->event_idx = event_idx;
    e->indirect = indirect;
    e->desc_iova = desc;
    e->avail_iova = avail;
    e->used_iova = used;
    if (map_ring(e) < 0)
        return -1;
    e->last_avail = e->avail_seen = last_avail;
    e->used_idx = used_idx;
    e->signalled = signalled;
    if (get_buffer(capacity, &e->cap_view, 8, "capacity") < 0)
        return -1;
    e->capacity = (volatile uint64_t *)e->cap_view.buf;
    e->readonly = readonly;
    memset(e->serial, 0, ID_BYTES);
    memcpy(e->serial, serial, (size_t)serial_len);
    e->backend = backend;
    e->fd = fd;
    if (backend == BACKEND_FD && fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd backend without an fd");
        return -1;
    }
    if (backend == BACKEND_MEMORY) {
        if (get_buffer(memory, &e->mem_view, 0, "memory") < 0)
            return -1;
        e->mem = e->mem_view.buf;
        e->mem_size = (uint64_t)e->mem_view.len;
    }
    if (log != Py_None) {
        if (get_buffer(log, &e->log_view, LOG_HEADER + LOG_ENTRY * (Py_ssize_t)num, "log") < 0)
            return -1;
        e->log = e->log_view.buf;
        e->batch = PyMem_Calloc(num, sizeof(uint16_t));
        if (e->batch == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    e->poll_ns = poll_ns;
    e->publish_ns = publish_ns;
    e->hold_ns = hold_ns;
    e->irq_fd = irq_fd;
    e->affinity_fd = affinity_fd;
    e->follow_mask = follow_mask;
    e->irq_cpu = -1;
    e->irq_request = irq_request;
    e->irq_index = irq_index;
    if (notify != Py_None) {
        Py_INCREF(notify);
        e->notify = notify;
    }
    if (on_error != Py_None) {
        Py_INCREF(on_error);
        e->on_error = on_error;
    }
    return 0;
}

static void release_buffers(Engine *e);

static void Engine_dealloc(Engine *e)
{
    release_buffers(e);
    PyMem_Free(e->batch);
    Py_XDECREF(e->notify);
    Py_XDECREF(e->on_error);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_run(Engine *e, PyObject *args)
{
    int kick_fd, stop_fd, r;
    struct pollfd fds[2];
    if (!PyArg_ParseTuple(args, "ii", &kick_fd, &stop_fd))
        return NULL;
    if (e->running || e->closed || e->num == 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running, closed or not initialised");
        return NULL;
    }
    e->running = 1;
    if (e->log != NULL)
        e->seq = ld64(e->log + 8); /* the Python path may have taken requests meanwhile */
    e->ts = PyEval_SaveThread();
    fds[0].fd = kick_fd;
    fds[0].events = POLLIN;
    fds[1].fd = stop_fd;
    fds[1].events = POLLIN;
    follow_cpu(e);
    r = drain(e);
    while (r == DRAIN_SLEEP) {
        uint64_t junk;
        if (e->stop) {
            r = RUN_STOPPED;
            break;
        }
        fds[0].revents = fds[1].revents = 0;
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            r = RUN_STOPPED; /* cannot happen with valid fds */
            break;
        }
        if (fds[1].revents) {
            r = RUN_STOPPED;
            break;
        }
        if (fds[0].revents & POLLIN)
            (void)!read(kick_fd, &junk, sizeof junk);
        follow_cpu(e);
        r = drain(e);
    }
    PyEval_RestoreThread(e->ts);
    e->ts = NULL;
    e->running = 0;
    return PyLong_FromLong(r);
}

/* Let go of every buffer (driver memory, the disk, the log, the capacity) so their owners
 * can close them; the counters stay readable. */
static void release_buffers(Engine *e)
{
    release_regions(e);
    if (e->cap_view.obj)
        PyBuffer_Release(&e->cap_view);
    if (e->mem_view.obj)
        PyBuffer_Release(&e->mem_view);
    if (e->log_view.obj)
        PyBuffer_Release(&e->log_view);
    e->desc = e->avail = e->used = NULL;
    e->capacity = NULL;
    e->mem = e->log = NULL;
}

static PyObject *Engine_close(Engine *e, PyObject *unused)
{
    if (e->running) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running");
        return NULL;
    }
    release_buffers(e);
    e->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_request_stop(Engine *e, PyObject *unused)
{
    __atomic_store_n(&e->stop, 1, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_regions(Engine *e, PyObject *regions)
{
    if (e->running || e->closed || e->num == 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running");
        return NULL;
    }
    {
        Py_buffer *old_views = e->views;
        Region *old_regions = e->regions;
        int old_n = e->nregions;
        e->views = NULL;
        e->regions = NULL;
        e->nregions = 0;
        if (load_regions(e, regions) < 0 || map_ring(e) < 0) {
            release_regions(e); /* the new map, if any: keep serving from the old one */
            e->views = old_views;
            e->regions = old_regions;
            e->nregions = old_n;
            e->hit = -1;
            map_ring(e);
            return NULL;
        }
        for (int k = 0; k < old_n; k++)
            PyBuffer_Release(&old_views[k]);
        PyMem_Free(old_views);
        PyMem_Free(old_regions);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_position(Engine *e, PyObject *unused)
{
    return Py_BuildValue("HHHK", e->last_avail, e->used_idx, e->signalled,
                         (unsigned long long)e->seq);
}

static PyObject *Engine_set_position(Engine *e, PyObject *args)
{
    unsigned short last_avail, used_idx, signalled;
    if (e->running) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "HHH", &last_avail, &used_idx, &signalled))
        return NULL;
    e->last_avail = e->avail_seen = last_avail;
    e->used_idx = used_idx;
    e->signalled = signalled;
    Py_RETURN_NONE;
}

static PyObject *Engine_counters(Engine *e, PyObject *unused)
{
    PyObject *hist = PyList_New(HIST_BUCKETS);
    if (hist == NULL)
        return NULL;
    for (int k = 0; k < HIST_BUCKETS; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(e->hist[k]);
        if (v == NULL) {
            Py_DECREF(hist);
            return NULL;
        }
        PyList_SET_ITEM(hist, k, v);
    }
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:N,s:{s:K,s:K,s:K,s:K},s:K,s:K,s:K}", "started",
        (unsigned long long)e->started, "completed", (unsigned long long)e->completed,
        "latency_ns", (unsigned long long)e->latency_ns, "latency", hist, "by_type", "0",
        (unsigned long long)e->n_in, "1", (unsigned long long)e->n_out, "4",
        (unsigned long long)e->n_flush, "8", (unsigned long long)e->n_get_id, "errors",
        (unsigned long long)e->errors, "bytes_read", (unsigned long long)e->bytes_read,
        "bytes_written", (unsigned long long)e->bytes_written);
}

static PyObject *Engine_get_started(Engine *e, void *closure)
{
    return PyLong_FromUnsignedLongLong(e->started);
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_VARARGS,
     "run(kick_fd, stop_fd) -> 0 stopped, 1 the next chain is for the Python path"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     "release driver memory, the disk and the log (after run() returned for good)"},
    {"request_stop", (PyCFunction)Engine_request_stop, METH_NOARGS,
     "make run() return at the next request (also write stop_fd to wake it)"},
    {"set_regions", (PyCFunction)Engine_set_regions, METH_O,
     "replace the driver-memory regions (after the Python path faulted new ones in)"},
    {"position", (PyCFunction)Engine_position, METH_NOARGS,
     "(last_avail, used_idx, signalled_used, log_seq)"},
    {"set_position", (PyCFunction)Engine_set_position, METH_VARARGS,
     "set_position(last_avail, used_idx, signalled_used)"},
    {"counters", (PyCFunction)Engine_counters, METH_NOARGS, "the counters as a dict"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"started", (getter)Engine_get_started, NULL,
     "monotonic ns when the request in flight was taken, 0 if none", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pyvduse.fastpath._splitblk.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One virtio-blk split virtqueue served in C (see pyvduse.fastpath).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_splitblk", "The native virtio-blk split-ring data path.", -1, NULL,
};

PyMODINIT_FUNC PyInit__splitblk(void)
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
    PyModule_AddIntConstant(m, "BACKEND_NULL", BACKEND_NULL);
    PyModule_AddIntConstant(m, "BACKEND_FD", BACKEND_FD);
    PyModule_AddIntConstant(m, "BACKEND_MEMORY", BACKEND_MEMORY);
    return m;
}
