/*
 * The NBD client path of the native engine: reads, writes and flushes as libnbd's
 * asynchronous commands (compiled only with SB_NBD, in pyvduse.fastpath._splitblk_full;
 * without it every entry point below is a stub and the constructor refuses BACKEND_NBD).
 *
 * The connection is made, checked and remade by Python (pyvduse/backend/nbd.py): the engine
 * gets a handle that is ready for commands, through the binding's NBD object and its capsule
 * (the binding and this extension load the same libnbd.so, so the handle is the same
 * object; the engine keeps the NBD object, whose __del__ closes it), and owns its socket:
 * no other thread polls it. A request taken from the ring becomes one command, sent at once
 * by libnbd on the engine's thread, straight from or into driver memory when the data is one
 * piece or pieces end to end (through the request's buffer otherwise); the serving loop
 * polls the socket beside the kick and stop fds and hands libnbd what is
 * ready (nbd_aio_notify_read/write); libnbd then calls each finished command's completion,
 * which only records it (nbd_ready: the completion may also run in Python's hands, while it
 * serves a chain this path left it, when the ring is not ours to write), and the loop
 * completes the recorded ones in its next round, in whatever order they came.
 *
 * A reply with an error fails that request (IOERR, on_error told). A connection that dies
 * (the server went away: the socket closed, or replies carry ENOTCONN, ESHUTDOWN, ...)
 * parks every request sent on it and every new one, and run() returns RUN_NBD_LOST: Python
 * reconnects within its window and gives the engine the new handle (set_nbd), which sends
 * the parked requests again (an NBD read or write may be repeated: it moves the same bytes
 * to the same place), or fails them (fail_parked). Completions of a handle given up are
 * recognised by their generation and ignored.
 *
 * Nothing is sent again while its original may still complete: a server may say ESHUTDOWN
 * for one command and keep the connection open, with others still to be answered. So a
 * connection error on a live handle shuts its socket down first (kill_handle): libnbd then
 * retires every command of the handle, calling each one's free callback, after which it
 * never touches their memory. Each request counts the commands libnbd holds for it
 * (Req.nbd_holds, raised when one is sent, lowered by its free callback): a request is sent
 * again only at 0, so its reply is that of the one command in flight for it, and its
 * memory -- driver memory or its buffer -- is never completed, reused or freed before
 * (SB_CHECK in debug builds; a buffer libnbd holds is leaked rather than freed).
 *
 * A request whose data is not one piece goes through its buffer BOUNCE_CHUNK bytes per
 * command, one command after the other: the memory allocated for it is bounded whatever
 * lengths its descriptors name (as on the io_uring path).
 */
#include "splitblk.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#ifdef SB_NBD

static int connection_error(int err)
{
    return err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET || err == EPIPE ||
           err == ECONNABORTED || err == ECONNREFUSED || err == ETIMEDOUT;
}

/* handle: the binding's NBD object (kept, so that its __del__, which closes the handle,
 * cannot run while the engine uses it), its capsule, or None. */
int sb_nbd_set(Engine *e, PyObject *handle)
{
    struct nbd_handle *h = NULL;
    if (handle != Py_None) {
        PyObject *capsule = handle;
        if (!PyCapsule_CheckExact(handle) &&
            (capsule = PyObject_GetAttrString(handle, "_o")) == NULL)
            return -1;
        h = PyCapsule_GetPointer(capsule, "nbd_handle");
        if (capsule != handle)
            Py_DECREF(capsule); /* the object keeps it */
        if (h == NULL)
            return -1;
        Py_INCREF(handle);
    }
    sb_nbd_release(e);
    e->nbd_ok = 0;
    e->nbd = h;
    e->nbd_owner = h != NULL ? handle : NULL;
    e->nbd_gen++;
    e->nbd_dead = h == NULL || nbd_aio_is_dead(h) || nbd_aio_is_closed(h);
    return 0;
}

static void kill_handle(Engine *e);

void sb_nbd_release(Engine *e)
{
    PyObject *owner = e->nbd_owner;
    if (e->nbd_holds && e->nbd != NULL) {
        e->nbd_gen++; /* their completions are not ours to count */
        kill_handle(e); /* libnbd retires them: their memory may be freed or reused */
    }
    e->nbd = NULL;
    e->nbd_owner = NULL;
    Py_XDECREF(owner);
}

/* libnbd's completion of one command: record it (see the top of the file). */
static int completed(void *user_data, int *error)
{
    Req *r = user_data;
    Engine *e = r->eng;
    if (r->nbd_state != NBD_SENT || r->nbd_gen != e->nbd_gen)
        return 1; /* sent on a connection given up since: it was parked (or dropped) */
    r->nbd_err = *error;
    r->nbd_state = NBD_READY;
    e->nbd_ready[e->nready++] = r->head;
    return 1;
}

/* libnbd's free callback of one command: it is done with the command's memory. */
static void released(void *user_data)
{
    Req *r = user_data;
    SB_CHECK(r->nbd_holds > 0 && r->eng->nbd_holds > 0);
    r->nbd_holds--;
    r->eng->nbd_holds--;
}

/* Shut the handle's socket down and let libnbd see it: the handle dies, and libnbd retires
 * every command it had (their completions and free callbacks run, here). */
static void kill_handle(Engine *e)
{
    struct nbd_handle *h = e->nbd;
    int fd;
    if (h == NULL || nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
        return;
    e->nbd_kills++;
    fd = nbd_aio_get_fd(h);
    if (fd >= 0)
        (void)shutdown(fd, SHUT_RDWR);
    for (int k = 0; k < 16 && !nbd_aio_is_dead(h) && !nbd_aio_is_closed(h); k++) {
        (void)nbd_aio_notify_read(h);
        if (!nbd_aio_is_dead(h) && !nbd_aio_is_closed(h))
            (void)nbd_aio_notify_write(h);
    }
}

static void park(Engine *e, Req *r)
{
    r->nbd_state = NBD_PARKED;
    e->nparked++;
}

/* The connection is gone: what was sent on it waits for the next one. */
static void lost(Engine *e)
{
    if (e->nbd_dead)
        return;
    e->nbd_dead = 1;
    e->nbd_gen++; /* late completions of the old handle are ignored */
    kill_handle(e); /* a live one that said ESHUTDOWN: nothing may complete on it later */
    for (int32_t h = e->oldest; h >= 0; h = e->reqs[h].next) {
        Req *r = &e->reqs[h];
        if (r->state == REQ_ASYNC && r->nbd_state == NBD_SENT)
            park(e, r);
    }
    if (e->abandoned) /* nobody will resend them: dropped, so the engine can end */
        sb_nbd_fail_parked(e, 1);
}

static void check_alive(Engine *e)
{
    struct nbd_handle *h = e->nbd;
    if (h != NULL && !e->nbd_dead && (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)))
        lost(e);
}

static void fail(Engine *e, Req *r, int err)
{
    if (!e->abandoned)
        sb_report_error(e, r->rtype, r->sector, err);
    sb_finish(e, r, S_IOERR, 0);
}

/* Whether the pieces lie end to end in our address space (VDUSE's bounce pages for
 * consecutive IOVAs usually do): then they are one buffer for libnbd. */
static int contiguous(const struct iovec *iov, int n)
{
    for (int k = 1; k < n; k++)
        if ((uint8_t *)iov[k - 1].iov_base + iov[k - 1].iov_len != (uint8_t *)iov[k].iov_base)
            return 0;
    return 1;
}

/* Send r's command (for a request through its buffer: its next chunk); 0, or the errno of a
 * command libnbd refused. */
static int send_command(Engine *e, Req *r)
{
    nbd_completion_callback cb = {.callback = completed, .user_data = r, .free = released};
    void *buf;
    size_t len;
    int64_t cookie;
    SB_CHECK(r->nbd_holds == 0); /* never two commands of one request at once */
    r->eng = e;
    r->nbd_gen = e->nbd_gen;
    r->nbd_state = NBD_SENT;
    r->nbd_holds++; /* released() lowers it, even when libnbd refuses the command */
    e->nbd_holds++;
    if (r->rtype == T_FLUSH) {
        cookie = nbd_aio_flush(e->nbd, cb, 0);
    } else {
        if (!r->bounced && contiguous(r->iov, r->niov)) {
            buf = r->iov[0].iov_base; /* one piece (or pieces end to end in our memory) */
            len = (size_t)r->len;
            r->chunk = len;
        } else { /* through its buffer, one chunk per command */
            uint64_t rest = r->len - r->done;
            len = rest < BOUNCE_CHUNK ? (size_t)rest : BOUNCE_CHUNK;
            if (sb_buffer(e, r, len) != 0) {
                r->nbd_state = NBD_IDLE;
                r->nbd_holds--;
                e->nbd_holds--;
                return ENOMEM;
            }
            if (!r->bounced) {
                r->bounced = 1;
                e->bounced++;
            }
            buf = r->buf;
            r->chunk = len;
            if (r->write)
                sb_gather(r->iov, r->niov, r->done, buf, len);
        }
        cookie = r->write ? nbd_aio_pwrite(e->nbd, buf, len, r->off + r->done, cb,
                                           e->nbd_fua ? LIBNBD_CMD_FLAG_FUA : 0)
                          : nbd_aio_pread(e->nbd, buf, len, r->off + r->done, cb, 0);
    }
    if (cookie < 0) {
        int err = nbd_get_errno();
        if (r->nbd_state == NBD_SENT) /* not already parked by a death inside the call */
            r->nbd_state = NBD_IDLE;
        return err ? err : EIO;
    }
    return 0;
}

static void start_or_park(Engine *e, Req *r)
{
    int err;
    if (e->nbd == NULL || e->nbd_dead) {
        park(e, r);
        return;
    }
    err = send_command(e, r);
    if (err == 0 || r->nbd_state == NBD_PARKED)
        return;
    check_alive(e);
    if (e->nbd_dead || connection_error(err)) {
        lost(e);
        park(e, r);
        return;
    }
    fail(e, r, err);
}

void sb_nbd_start(Engine *e, Req *r)
{
    r->eng = e;
    r->nbd_state = NBD_IDLE;
    r->done = 0;
    r->chunk = 0;
    start_or_park(e, r);
}

uint32_t sb_nbd_reap(Engine *e)
{
    uint32_t n = 0;
    check_alive(e); /* errors that came with the connection's end are the connection's */
    while (e->nready) {
        uint32_t count = e->nready;
        e->nready = 0;
        for (uint32_t k = 0; k < count; k++) {
            Req *r = &e->reqs[e->nbd_ready[k]];
            int err = r->nbd_err;
            if (r->state != REQ_ASYNC || r->nbd_state != NBD_READY)
                continue;
            n++;
            r->nbd_state = NBD_IDLE;
            if (e->abandoned ||
                r->take_no <= __atomic_load_n(&e->poison_mark, __ATOMIC_ACQUIRE)) {
                sb_finish(e, r, S_IOERR, 0);
                continue;
            }
            if (err && (connection_error(err) || e->nbd_dead)) { /* the connection's */
                lost(e);
                park(e, r);
                continue;
            }
            if (err) {
                fail(e, r, err);
                continue;
            }
            e->nbd_ok++;
            if (r->rtype == T_FLUSH) {
                sb_finish(e, r, S_OK, 0);
                continue;
            }
            if (r->bounced) {
                if (!r->write)
                    sb_scatter(r->iov, r->niov, r->done, r->buf, r->chunk);
                r->done += r->chunk;
                if (r->done < r->len) { /* the next chunk */
                    start_or_park(e, r);
                    continue;
                }
            }
            if (r->write) {
                e->bytes_written += r->len;
                sb_finish(e, r, S_OK, 0);
            } else {
                e->bytes_read += r->len;
                sb_finish(e, r, S_OK, (uint32_t)r->len);
            }
        }
    }
    return n;
}

int sb_nbd_ready(Engine *e) { return e->nready > 0; }

int sb_nbd_poll_fd(Engine *e, short *events)
{
    unsigned dir;
    int fd;
    if (e->nbd == NULL || e->nbd_dead)
        return -1;
    fd = nbd_aio_get_fd(e->nbd);
    if (fd < 0)
        return -1;
    dir = nbd_aio_get_direction(e->nbd);
    *events = POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        *events |= POLLOUT;
    return fd;
}

void sb_nbd_notify(Engine *e, short revents)
{
    if (e->nbd == NULL || e->nbd_dead)
        return;
    if (revents & (POLLIN | POLLHUP | POLLERR))
        (void)nbd_aio_notify_read(e->nbd);
    if (revents & POLLOUT)
        (void)nbd_aio_notify_write(e->nbd);
    check_alive(e);
}

void sb_nbd_pump(Engine *e)
{
    struct pollfd p;
    if ((p.fd = sb_nbd_poll_fd(e, &p.events)) < 0)
        return;
    p.revents = 0;
    if (poll(&p, 1, 0) > 0)
        sb_nbd_notify(e, p.revents);
}

void sb_nbd_fail_parked(Engine *e, int drop)
{
    for (int32_t h = e->oldest, next; h >= 0; h = next) {
        Req *r = &e->reqs[h];
        next = r->next;
        if (r->state == REQ_ASYNC && r->nbd_state == NBD_PARKED) {
            r->nbd_state = NBD_IDLE;
            e->nparked--;
            if (drop)
                sb_finish(e, r, S_IOERR, 0);
            else
                fail(e, r, EIO);
        }
    }
}

void sb_nbd_resend(Engine *e)
{
    for (int32_t h = e->oldest, next; h >= 0; h = next) {
        Req *r = &e->reqs[h];
        next = r->next;
        if (r->state == REQ_ASYNC && r->nbd_state == NBD_PARKED) {
            SB_CHECK(r->nbd_holds == 0); /* the old handle retired its command */
            if (r->nbd_holds)
                continue; /* its original may still complete: it waits (never in practice) */
            e->nparked--;
            r->nbd_state = NBD_IDLE;
            start_or_park(e, r);
            if (e->nbd_dead)
                break; /* lost again: the rest stay parked */
        }
    }
}

#else /* !SB_NBD */

int sb_nbd_set(Engine *e, PyObject *capsule)
{
    PyErr_SetString(PyExc_ValueError, "BACKEND_NBD: this build of the engine has no libnbd");
    return -1;
}
void sb_nbd_release(Engine *e) {}
void sb_nbd_start(Engine *e, Req *r) {}
uint32_t sb_nbd_reap(Engine *e) { return 0; }
int sb_nbd_ready(Engine *e) { return 0; }
int sb_nbd_poll_fd(Engine *e, short *events) { return -1; }
void sb_nbd_notify(Engine *e, short revents) {}
void sb_nbd_pump(Engine *e) {}
void sb_nbd_fail_parked(Engine *e, int drop) {}
void sb_nbd_resend(Engine *e) {}

#endif
