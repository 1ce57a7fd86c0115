/*
 * The virtio-blk side of the native data path: which chains this path takes, serving the
 * ones that complete inline, and completing a request.
 *
 * It takes IN, OUT, FLUSH and GET_ID from well-formed chains (see sb_take for what it leaves
 * to Python). GET_ID, the null and memory backends, the file backend with aio=AIO_SYNC, and
 * every request that fails before touching the backend (out of range, read-only) are served
 * inline, here; reads, writes and flushes of the file backend with aio=AIO_URING go to
 * splitblk_uring.c, which calls sb_finish when they end, in whatever order they end.
 *
 * Direct I/O (the file was opened with O_DIRECT): a request whose buffers are not aligned
 * (each iov_base and iov_len a multiple of dio_align) moves through an aligned buffer of the
 * engine's own; one whose offset or length is not aligned is left to Python (it cannot be
 * served by copying alone: a write would need a read-modify-write of the blocks around it).
 *
 * Memory the kernel cannot pin: a transfer between the file and driver memory that fails
 * with EFAULT is done again through a buffer of the engine's own, and from then on every
 * request of that storage is copied (sb_unpinnable). The kernel pins the pages VDUSE maps
 * for its bounce buffer neither for O_DIRECT nor for a FUSE file in direct-I/O mode
 * (virtiofs with cache=none), whose even buffered reads and writes pin the user's buffer;
 * counters: bounced, efaults, bounce_all.
 */
#include "splitblk.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

/* Calls back into Python with the GIL: for the rare paths only. */
void sb_report_error(Engine *e, uint32_t rtype, uint64_t sector, int err)
{
    PyObject *res;
    int was;
    if (e->on_error == NULL)
        return;
    was = sb_gil_enter(e);
    res = PyObject_CallFunction(e->on_error, "IKi", rtype, (unsigned long long)sector, err);
    if (res == NULL)
        PyErr_WriteUnraisable(e->on_error);
    Py_XDECREF(res);
    sb_gil_leave(e, was);
}

/* The storage cannot reach driver memory (EFAULT): copy from now on, and say so once per
 * storage (the byte is shared by its engines and its Python backend, which logs). */
void sb_unpinnable(Engine *e)
{
    PyObject *res;
    int was;
    e->efaults++;
    e->bounce_all = 1;
    if (__atomic_exchange_n(e->unpinnable, 1, __ATOMIC_ACQ_REL) || e->on_unpinnable == NULL)
        return;
    was = sb_gil_enter(e);
    res = PyObject_CallNoArgs(e->on_unpinnable);
    if (res == NULL)
        PyErr_WriteUnraisable(e->on_unpinnable);
    Py_XDECREF(res);
    sb_gil_leave(e, was);
}

int sb_fake_efault(Engine *e)
{
    if (e->test_efault == 0)
        return 0;
    e->test_efault--;
    return 1;
}

static int in_range(Engine *e, uint64_t sector, uint64_t len)
{
    uint64_t cap = *e->capacity, off;
    if (sector > (UINT64_MAX >> 9))
        return 0;
    off = sector << 9;
    return off <= cap && len <= cap - off;
}

/* Data bytes of the chain just walked: after the header (OUT), before the status (IN). */
static uint64_t in_len(Engine *e) { return sb_iov_total(e->wr, e->nwr) - 1; }
static uint64_t out_len(Engine *e) { return sb_iov_total(e->rd, e->nrd) - OUTHDR_SIZE; }

int sb_aligned(const Engine *e, const struct iovec *iov, int n)
{
    uint64_t mask = e->dio_align - 1;
    for (int k = 0; k < n; k++)
        if (((uintptr_t)iov[k].iov_base | iov[k].iov_len) & mask)
            return 0;
    return 1;
}

/* Take the next chain if this path can serve it: 1 taken (head, type, sector, status set),
 * 0 ring empty, -1 leave it to Python. Nothing changes unless it returns 1. Left to Python:
 * a head out of range, a head still in flight (a driver offering it again: Python's ring
 * breaks the queue), a malformed chain or memory not mapped (sb_walk), a request type other
 * than the four, with direct I/O an offset or length not aligned for it, and with NBD a
 * read or write longer than the server takes in one command. */
int sb_take(Engine *e, uint16_t *head, uint32_t *rtype, uint64_t *sector, uint8_t **status)
{
    uint8_t hdr[OUTHDR_SIZE];
    struct iovec *last;
    uint32_t t;
    uint16_t h;
    uint64_t s;
    int k = sb_next_head(e, &h);
    if (k <= 0)
        return k;
    if (sb_walk(e, h) < 0 || e->nwr == 0 || e->nrd == 0 ||
        sb_iov_total(e->rd, e->nrd) < OUTHDR_SIZE)
        return -1;
    sb_gather_header(e->rd, e->nrd, hdr);
    t = ld32(hdr) & ~T_BARRIER;
    if (t != T_IN && t != T_OUT && t != T_FLUSH && t != T_GET_ID)
        return -1;
    s = ld64(hdr + 8);
    if (e->backend == BACKEND_NBD && (t == T_IN || t == T_OUT) &&
        (t == T_IN ? in_len(e) : out_len(e)) > e->nbd_max)
        return -1; /* Python splits it into commands the server takes */
    if (e->direct && (t == T_IN || t == T_OUT) && s <= (UINT64_MAX >> 9) &&
        (((s << 9) | (t == T_IN ? in_len(e) : out_len(e))) & (e->dio_align - 1)))
        return -1;
    last = &e->wr[e->nwr - 1];
    *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    *head = h;
    *rtype = t;
    *sector = s;
    e->last_avail++;
    sb_log_taken(e, h);
    return 1;
}

/* -- serving inline ------------------------------------------------------------------- */

/* preadv/pwritev the whole of iov at off; short transfers continue, EOF reads zeroes.
 * iov is consumed. */
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

static size_t buffer_align(const Engine *e)
{
    return e->dio_align > 4096 ? (size_t)e->dio_align : 4096;
}

/* The same through the engine's own aligned buffer, BOUNCE_CHUNK bytes at a time. */
static int fd_bounced(Engine *e, const struct iovec *iov, int n, uint64_t off, uint64_t len,
                      int write)
{
    if (e->sync_buf == NULL) {
        void *p;
        if (posix_memalign(&p, buffer_align(e), BOUNCE_CHUNK) != 0)
            return ENOMEM;
        e->sync_buf = p;
    }
    e->bounced++;
    for (uint64_t done = 0; done < len;) {
        size_t chunk = len - done < BOUNCE_CHUNK ? (size_t)(len - done) : BOUNCE_CHUNK;
        struct iovec one = {e->sync_buf, chunk};
        int err;
        if (write)
            sb_gather(iov, n, done, e->sync_buf, chunk);
        if ((err = fd_transfer(e->fd, &one, 1, off + done, write)) != 0)
            return err;
        if (!write)
            sb_scatter(iov, n, done, e->sync_buf, chunk);
        done += chunk;
    }
    return 0;
}

/* The file backend, synchronously: straight between the file and driver memory, or through
 * the engine's buffer (see the header comment). */
static int fd_io(Engine *e, const struct iovec *iov, int n, uint64_t off, uint64_t len,
                 int write)
{
    int err;
    if (!sb_copying(e) && !(e->direct && !sb_aligned(e, iov, n))) {
        memcpy(e->tmp, iov, (size_t)n * sizeof *iov); /* fd_transfer consumes its iov */
        err = fd_transfer(e->fd, e->tmp, n, off, write);
        if (err == 0 && sb_fake_efault(e))
            err = EFAULT;
        if (err != EFAULT)
            return err;
        sb_unpinnable(e); /* what moved before the fault is moved again */
    }
    return fd_bounced(e, iov, n, off, len, write);
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
        return fd_io(e, iov, n, off, len, write);
    }
}

/* Serve a request inline from the chain just walked; its status, and the data length
 * written in *written. */
static uint8_t serve(Engine *e, uint32_t rtype, uint64_t sector, uint32_t *written)
{
    struct iovec data[MAX_SEGS];
    uint64_t ilen = in_len(e);
    uint8_t st = S_OK;
    int n, err = 0;

    *written = 0;
    switch (rtype) {
    case T_IN:
        e->n_in++;
        if (!in_range(e, sector, ilen)) {
            st = S_IOERR;
            break;
        }
        n = sb_iov_slice(e->wr, e->nwr, 0, ilen, data);
        if (ilen && (err = backend_io(e, data, n, sector << 9, ilen, 0)) != 0) {
            st = S_IOERR;
            break;
        }
        e->bytes_read += ilen;
        *written = (uint32_t)ilen;
        break;
    case T_OUT: {
        uint64_t olen = out_len(e);
        e->n_out++;
        if (e->readonly || !in_range(e, sector, olen)) {
            st = S_IOERR;
            break;
        }
        n = sb_iov_slice(e->rd, e->nrd, OUTHDR_SIZE, olen, data);
        if (olen && (err = backend_io(e, data, n, sector << 9, olen, 1)) != 0) {
            st = S_IOERR;
            break;
        }
        e->bytes_written += olen;
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
        uint64_t want = ilen < ID_BYTES ? ilen : ID_BYTES;
        size_t pos = 0;
        e->n_get_id++;
        n = sb_iov_slice(e->wr, e->nwr, 0, want, data);
        for (int k = 0; k < n; k++) {
            memcpy(data[k].iov_base, e->serial + pos, data[k].iov_len);
            pos += data[k].iov_len;
        }
        *written = (uint32_t)want;
        break;
    }
    }
    if (err)
        sb_report_error(e, rtype, sector, err);
    return st;
}

/* -- starting and completing ------------------------------------------------------------ */

/* Whether a request just taken goes to io_uring (or to the NBD server): reads, writes and
 * flushes that will touch the backend (the rest fails or succeeds inline, as serve() would). */
static int goes_async(Engine *e, uint32_t rtype, uint64_t sector)
{
    uint64_t len;
    if (!use_uring(e) && e->backend != BACKEND_NBD)
        return 0;
    switch (rtype) {
    case T_IN:
        len = in_len(e);
        return len && in_range(e, sector, len);
    case T_OUT:
        len = out_len(e);
        return len && !e->readonly && in_range(e, sector, len);
    case T_FLUSH:
        return !e->readonly;
    default:
        return 0;
    }
}

static int req_iov(Req *r, int n)
{
    if (r->iov_cap < n) {
        struct iovec *p = realloc(r->iov, 2 * (size_t)n * sizeof *p);
        if (p == NULL)
            return -1;
        r->iov = p;
        r->iov_cap = n;
    }
    return 0;
}

/* A read or write try_inline served, with err (0 or an errno): its status, used length and
 * counters. 1. */
static int served_inline(Engine *e, uint32_t rtype, uint64_t sector, uint64_t len, int err,
                         uint8_t *st, uint32_t *written)
{
    int write = rtype == T_OUT;
    *st = err ? S_IOERR : S_OK;
    *written = write || err ? 0 : (uint32_t)len;
    if (err)
        sb_report_error(e, rtype, sector, err);
    else if (write)
        e->bytes_written += len;
    else
        e->bytes_read += len;
    if (write)
        e->n_out++;
    else
        e->n_in++;
    e->inline_done++;
    return 1;
}

/* With --aio io_uring and the page cache (not direct): try a read or write inline first,
 * without blocking (RWF_NOWAIT). A read the page cache holds, or a write it absorbs, is then
 * done with no io_uring submission, no io-wq thread and no wake-up: in the test VM an
 * io_uring buffered write cost twice an inline one, and a buffered read that hit the cache
 * a thread hand-off. What would block (EAGAIN, or a short transfer) goes to io_uring whole
 * (redoing the part that moved is harmless: the same bytes at the same place). A file that
 * refuses RWF_NOWAIT writes (Linux's block devices and tmpfs do, EOPNOTSUPP) gets its writes
 * inline: into the page cache, blocking only when writeback throttles them, which is
 * measured to cost less than handing each to an io-wq thread. One that refuses RWF_NOWAIT
 * reads gets them inline too when its data is in memory (tmpfs, ramfs: io_uring could only
 * hand each to an io-wq thread, which cost 2.2 times the IOPS of a 4k read in the test VM),
 * and on io_uring otherwise (NFS, FUSE: a read may wait for a server). An EFAULT (memory the
 * kernel cannot pin) makes the engine copy, so the request goes to io_uring through its
 * buffer. 1: served (status and *written set). */
static int try_inline(Engine *e, uint32_t rtype, uint64_t sector, uint8_t *st, uint32_t *written)
{
    uint64_t len = rtype == T_IN ? in_len(e) : out_len(e);
    int write = rtype == T_OUT, n;
    ssize_t r;
    if (e->backend != BACKEND_FD || !e->nowait || e->direct || sb_copying(e) ||
        (rtype != T_IN && rtype != T_OUT) ||
        (e->gate_fd >= 0 && (sector & e->gate_mask))) /* test-only: gated ones wait */
        return 0;
    if (!write && e->nowait_reads == -2)
        return 0;
    n = write ? sb_iov_slice(e->rd, e->nrd, OUTHDR_SIZE, len, e->tmp)
              : sb_iov_slice(e->wr, e->nwr, 0, len, e->tmp);
    if (write ? e->nowait_writes < 0 : e->nowait_reads < 0) { /* refused: blocking, inline */
        int err = fd_transfer(e->fd, e->tmp, n, sector << 9, write);
        if (err == 0 && sb_fake_efault(e))
            err = EFAULT;
        if (err == EFAULT) {
            sb_unpinnable(e);
            return 0;
        }
        return served_inline(e, rtype, sector, len, err, st, written);
    }
    do {
        r = write ? pwritev2(e->fd, e->tmp, n, (off_t)(sector << 9), RWF_NOWAIT)
                  : preadv2(e->fd, e->tmp, n, (off_t)(sector << 9), RWF_NOWAIT);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EOPNOTSUPP) {
        if (write)
            e->nowait_writes = -1;
        else
            e->nowait_reads = e->resident ? -1 : -2;
        return try_inline(e, rtype, sector, st, written);
    }
    if ((r < 0 && errno == EFAULT) || (r >= 0 && sb_fake_efault(e))) {
        sb_unpinnable(e);
        return 0;
    }
    if (r < 0 || (uint64_t)r != len)
        return 0; /* EAGAIN, short (or an error: io_uring will meet and report it) */
    return served_inline(e, rtype, sector, len, 0, st, written);
}

/* Serve or submit the chain sb_take just took (it is in e->rd / e->wr), taken at now;
 * 1 when it completed inline. */
int sb_start(Engine *e, uint16_t head, uint32_t rtype, uint64_t sector, uint8_t *status,
             uint64_t now)
{
    Req *r = sb_track(e, head, now);
    uint32_t written;
    uint8_t st;
    r->rtype = rtype;
    r->sector = sector;
    r->status = status;
    if (goes_async(e, rtype, sector) && try_inline(e, rtype, sector, &st, &written)) {
        sb_finish(e, r, st, written);
        return 1;
    }
    if (goes_async(e, rtype, sector)) {
        int n = 0;
        r->write = rtype == T_OUT;
        r->off = sector << 9;
        r->len = 0;
        if (rtype == T_IN) {
            e->n_in++;
            r->len = in_len(e);
            n = sb_iov_slice(e->wr, e->nwr, 0, r->len, e->tmp);
        } else if (rtype == T_OUT) {
            e->n_out++;
            r->len = out_len(e);
            n = sb_iov_slice(e->rd, e->nrd, OUTHDR_SIZE, r->len, e->tmp);
        } else {
            e->n_flush++;
        }
        if (n && req_iov(r, n) < 0) {
            sb_report_error(e, rtype, sector, ENOMEM);
            sb_finish(e, r, S_IOERR, 0);
            return 1;
        }
        if (n)
            memcpy(r->iov, e->tmp, (size_t)n * sizeof *r->iov);
        r->niov = n;
        if (n && (sb_copying(e) || (e->direct && !sb_aligned(e, r->iov, n)))) {
            r->bounced = 1;
            e->bounced++;
        }
        r->state = REQ_ASYNC;
        e->nasync++;
        if (e->backend == BACKEND_NBD) {
            sb_nbd_start(e, r);
        } else {
            sb_uring_start(e, r);
            if (e->test_serial)
                sb_uring_wait(e, r);
        }
        return r->state == REQ_FREE; /* it may have failed at once */
    }
    st = serve(e, rtype, sector, &written);
    sb_finish(e, r, st, written);
    return 1;
}

/* A request is done: its status byte, its used element (pushed, not published), its
 * latency. Requests taken before a poison_in_flight() fail with IOERR whatever they did,
 * with a used length of 0 when even their status byte was in memory unmapped meanwhile
 * (the driver would read a stale one); on an abandoned engine they are only dropped. */
void sb_finish(Engine *e, Req *r, uint8_t st, uint32_t written)
{
    uint32_t used;
    if (r->state == REQ_ASYNC)
        e->nasync--;
    SB_CHECK(r->nbd_holds == 0 || e->abandoned); /* libnbd is done with its memory */
    sb_buffer_done(e, r);
    if (e->abandoned) {
        sb_untrack(e, r);
        return;
    }
    used = written + 1;
    if (r->take_no <= __atomic_load_n(&e->poison_mark, __ATOMIC_ACQUIRE)) {
        st = S_IOERR;
        used = sb_visible(e, r->status) ? 1 : 0;
    }
    if (st != S_OK)
        e->errors++;
    *r->status = st;
    sb_complete(e, r, used);
}

/* Any request's end (virtio-blk's and virtio-net's): its latency, out of the table, its
 * used element (pushed, not published). */
void sb_complete(Engine *e, Req *r, uint32_t used)
{
    uint16_t head = r->head;
    uint64_t lat;
    e->clock = now_ns();
    lat = e->clock - r->t_take;
    e->hist[bit_length(lat / 1000) & (HIST_BUCKETS - 1)]++;
    e->latency_ns += lat;
    e->completed++;
    sb_untrack(e, r);
    sb_push(e, head, used);
}

/* -- the aligned buffers of requests ---------------------------------------------------- */

/* r->buf holding at least size bytes (size <= BOUNCE_CHUNK); 0 or ENOMEM. */
int sb_buffer(Engine *e, Req *r, size_t size)
{
    size_t cap = 4096;
    void *p;
    if (r->buf != NULL && r->buf_cap >= size)
        return 0;
    while (cap < size)
        cap <<= 1;
    if (r->buf != NULL) {
        free(r->buf);
        e->bounce_retained -= r->buf_cap;
        r->buf = NULL;
        r->buf_cap = 0;
    }
    if (posix_memalign(&p, buffer_align(e), cap) != 0)
        return ENOMEM;
    r->buf = p;
    r->buf_cap = cap;
    e->bounce_retained += cap;
    if (e->bounce_retained > e->bounce_peak)
        e->bounce_peak = e->bounce_retained;
    return 0;
}

/* The request no longer uses its buffer: keep it for the head's next request, unless it is
 * large or the engine keeps enough already. */
void sb_buffer_done(Engine *e, Req *r)
{
    if (r->nbd_holds) /* libnbd may still write into it (an abandoned engine's request) */
        return;
    if (r->buf != NULL && (r->buf_cap > BOUNCE_KEEP || e->bounce_retained > BOUNCE_RETAIN)) {
        free(r->buf);
        e->bounce_retained -= r->buf_cap;
        r->buf = NULL;
        r->buf_cap = 0;
    }
}
