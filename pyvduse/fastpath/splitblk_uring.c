/*
 * The asynchronous file path of the native engine: reads, writes and flushes on an io_uring
 * the engine owns (liburing; compiled only with SB_URING, in pyvduse.fastpath._splitblk_uring;
 * without it every entry point below is a stub and the constructor refuses AIO_URING).
 *
 * The ring has the virtqueue's size as its depth: a head is in flight at most once, so at
 * most num requests are (each with one SQE at a time). The serving loop prepares an SQE per
 * request it takes (IORING_OP_READV / WRITEV with the request's iovecs in driver memory at
 * its byte offset, or READ / WRITE of the engine's aligned buffer, or FSYNC with
 * IORING_FSYNC_DATASYNC), submits them once per round, and reaps completions from the
 * completion ring without a system call (io_uring_for_each_cqe). An eventfd registered with
 * the ring makes completions wake the loop's poll(2) beside the kick and stop fds.
 *
 * Requests belong to the thread that submitted them: when it exits, the kernel cancels the
 * ones still waiting (io-wq work not started, a poll-armed read), and they complete with
 * -ECANCELED; the engine then submits them again from the thread that reaps (wait_idle() or
 * the next run()). Calling wait_idle() on the thread that ran run() avoids the detour.
 *
 * A completion: -EINTR / -EAGAIN: the same step again. A short transfer: the rest is
 * submitted (a read that returns 0 is at the end of the file: the rest reads as zeroes, as
 * the synchronous path does; a write that returns 0 is EIO). -EFAULT on a transfer with
 * driver memory (memory the kernel cannot pin): again through the engine's aligned buffer,
 * and from then on every request is copied (see splitblk_blk.c). Any other error: the
 * request fails with IOERR and on_error is told, as on the synchronous path.
 *
 * FLUSH is submitted when it is taken, with no IOSQE_IO_DRAIN: virtio-blk asks a flush to
 * cover the writes that had *completed* when it was submitted, and the driver counts a
 * write as completed only once it has seen its used element, which this engine writes only
 * after the write's CQE arrived. So every write a flush must cover has finished in the
 * kernel before the flush is even taken; writes still in flight beside it are not covered by
 * the spec either, and draining them would only add latency.
 *
 * Test-only knobs (the config's test group: gate_fd, gate_mask, efault, serial): a request
 * whose sector has a bit of the mask set is linked behind a one-byte read of the gate fd (a
 * pipe the test writes to), so it cannot start, let alone finish, before the test says:
 * completions out of order on demand (a gate cancelled with its thread is read again, up to
 * 8 times). efault makes the next N transfers between the file and driver memory (here and
 * on the inline paths) fail as if with EFAULT. serial waits for each request as soon as it
 * is submitted, so that the differential tests (fuzz/ring_cases.py) see completions in the
 * order the Python engine makes them.
 */
#include "splitblk.h"

#include <errno.h>
#include <unistd.h>

#ifdef SB_URING

#include <sys/eventfd.h>

int sb_uring_open(Engine *e)
{
    int err = io_uring_queue_init(e->num, &e->ring, IORING_SETUP_SUBMIT_ALL);
    if (err == -EINVAL) /* a kernel older than 5.18 */
        err = io_uring_queue_init(e->num, &e->ring, 0);
    if (err < 0)
        return err;
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->efd < 0) {
        err = -errno;
        io_uring_queue_exit(&e->ring);
        return err;
    }
    if ((err = io_uring_register_eventfd(&e->ring, e->efd)) < 0) {
        close(e->efd);
        io_uring_queue_exit(&e->ring);
        return err;
    }
    e->ring_ok = 1;
    e->uring_out = 0;
    return 0;
}

void sb_uring_close(Engine *e)
{
    if (!e->ring_ok)
        return;
    io_uring_queue_exit(&e->ring);
    close(e->efd);
    e->ring_ok = 0;
    e->efd = -1;
}

/* Submit what is queued; with completions the kernel holds back because the completion
 * ring was full (IORING_SQ_CQ_OVERFLOW), enter it even with nothing queued: only a call
 * that enters the kernel moves them into the ring, where reaping sees them. */
void sb_uring_submit(Engine *e)
{
    if (e->ring_ok && (io_uring_sq_ready(&e->ring) || io_uring_cq_has_overflow(&e->ring)))
        (void)io_uring_submit(&e->ring); /* EINTR, EAGAIN, EBUSY: they stay queued */
}

int sb_uring_ready(Engine *e)
{
    return e->ring_ok && (io_uring_cq_ready(&e->ring) > 0 || io_uring_cq_has_overflow(&e->ring));
}

int sb_uring_pending(Engine *e)
{
    return e->ring_ok && io_uring_sq_ready(&e->ring) > 0;
}

/* An SQE, counted in uring_out (each one the kernel takes ends in exactly one CQE: no
 * IOSQE_CQE_SKIP_SUCCESS here), or NULL when the submission ring is full. */
static struct io_uring_sqe *take_sqe(Engine *e)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
    if (sqe != NULL)
        e->uring_out++;
    return sqe;
}

/* An SQE; when the submission ring is full, what it holds is submitted first. */
static struct io_uring_sqe *get_sqe(Engine *e)
{
    struct io_uring_sqe *sqe = take_sqe(e);
    if (sqe == NULL) {
        (void)io_uring_submit(&e->ring);
        sqe = take_sqe(e);
    }
    return sqe;
}

static void fail(Engine *e, Req *r, int err)
{
    if (!e->abandoned)
        sb_report_error(e, r->rtype, r->sector, err);
    sb_finish(e, r, S_IOERR, 0);
}

/* Prepare the SQE of r's next step (from r->done); 0 or an errno. */
static int prep_step(Engine *e, Req *r)
{
    struct io_uring_sqe *sqe;
    uint64_t at = r->off + r->done;
    if (r->rtype == T_FLUSH) {
        if ((sqe = get_sqe(e)) == NULL)
            return EBUSY;
        io_uring_prep_fsync(sqe, e->fd, IORING_FSYNC_DATASYNC);
    } else if (r->bounced) {
        uint64_t rest = r->len - r->done;
        size_t chunk = rest < BOUNCE_CHUNK ? (size_t)rest : BOUNCE_CHUNK;
        if (sb_buffer(e, r, chunk) != 0)
            return ENOMEM;
        if ((sqe = get_sqe(e)) == NULL)
            return EBUSY;
        if (r->write)
            sb_gather(r->iov, r->niov, r->done, r->buf, chunk);
        r->chunk = chunk;
        if (r->write)
            io_uring_prep_write(sqe, e->fd, r->buf, (unsigned)chunk, at);
        else
            io_uring_prep_read(sqe, e->fd, r->buf, (unsigned)chunk, at);
    } else {
        const struct iovec *iov = r->iov;
        int n = r->niov;
        if (r->done) { /* the rest of a short transfer */
            n = sb_iov_slice(r->iov, r->niov, r->done, r->len - r->done, r->iov + r->iov_cap);
            iov = r->iov + r->iov_cap;
        }
        if ((sqe = get_sqe(e)) == NULL)
            return EBUSY;
        if (r->write)
            io_uring_prep_writev(sqe, e->fd, iov, (unsigned)n, at);
        else
            io_uring_prep_readv(sqe, e->fd, iov, (unsigned)n, at);
    }
    io_uring_sqe_set_data(sqe, r);
    return 0;
}

static void resubmit(Engine *e, Req *r)
{
    int err = prep_step(e, r);
    if (err)
        fail(e, r, err);
}

void sb_uring_start(Engine *e, Req *r)
{
    struct io_uring_sqe *gate = NULL;
    int err;
    if (e->gate_fd >= 0 && (r->sector & e->gate_mask) && r->gates++ < 8) { /* test-only */
        if (io_uring_sq_space_left(&e->ring) < 2)
            (void)io_uring_submit(&e->ring);
        if ((gate = take_sqe(e)) != NULL) {
            io_uring_prep_read(gate, e->gate_fd, e->gate_buf + r->head % 64, 1, (uint64_t)-1);
            gate->flags |= IOSQE_IO_LINK;
            io_uring_sqe_set_data64(gate, TAG_GATE);
        }
    }
    if ((err = prep_step(e, r)) != 0) {
        if (gate != NULL) /* linked to nothing now: the next SQE is another request's */
            gate->flags &= ~IOSQE_IO_LINK;
        fail(e, r, err);
    }
}

/* One CQE of request r. */
static void complete_step(Engine *e, Req *r, int res)
{
    uint64_t got;
    if (e->abandoned || r->take_no <= __atomic_load_n(&e->poison_mark, __ATOMIC_ACQUIRE)) {
        sb_finish(e, r, S_IOERR, 0); /* dropped, or IOERR whatever it moved */
        return;
    }
    if (res == -EINTR || res == -EAGAIN) {
        resubmit(e, r);
        return;
    }
    if (res == -ECANCELED) {
        /* Not by us (abandon() drops): the thread that submitted it exited, and the kernel
         * cancels what a task leaves pending. Nothing moved: submit it again, from here. */
        sb_uring_start(e, r);
        return;
    }
    if (r->rtype == T_FLUSH) {
        if (res < 0)
            fail(e, r, -res);
        else
            sb_finish(e, r, S_OK, 0);
        return;
    }
    if (res >= 0 && !r->bounced && sb_fake_efault(e))
        res = -EFAULT;
    if (res == -EFAULT && !r->bounced) { /* memory the kernel cannot pin: copy from now on */
        sb_unpinnable(e);
        e->bounced++;
        r->bounced = 1;
        resubmit(e, r); /* from r->done: what moved before is moved again */
        return;
    }
    if (res < 0) {
        fail(e, r, -res);
        return;
    }
    got = (uint64_t)res;
    if (got > r->len - r->done)
        got = r->len - r->done;
    if (r->bounced) {
        if (got > r->chunk)
            got = r->chunk;
        if (!r->write)
            sb_scatter(r->iov, r->niov, r->done, r->buf, got);
    }
    if (got == 0) {
        if (r->write) {
            fail(e, r, EIO);
            return;
        }
        sb_zero(r->iov, r->niov, r->done); /* past the end of the file */
        r->done = r->len;
    } else {
        r->done += got;
    }
    if (r->done < r->len) {
        resubmit(e, r);
        return;
    }
    if (r->write)
        e->bytes_written += r->len;
    else
        e->bytes_read += r->len;
    sb_finish(e, r, S_OK, r->write ? 0 : (uint32_t)r->len);
}

uint32_t sb_uring_reap(Engine *e)
{
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    uint32_t done = 0;
    if (!e->ring_ok)
        return 0;
    if (io_uring_cq_has_overflow(&e->ring))
        (void)io_uring_get_events(&e->ring); /* what the full ring held back, into it */
    io_uring_for_each_cqe(&e->ring, head, cqe) {
        uint64_t tag = io_uring_cqe_get_data64(cqe);
        seen++;
        if (tag == TAG_GATE || tag == TAG_CANCEL)
            continue;
        complete_step(e, (Req *)(uintptr_t)tag, cqe->res);
        done++;
    }
    io_uring_cq_advance(&e->ring, seen);
    SB_CHECK(seen <= e->uring_out, "more completions than SQEs");
    e->uring_out -= seen <= e->uring_out ? seen : e->uring_out;
    return done;
}

/* test_serial (differential tests): complete r before anything else happens, so requests
 * complete in the order they were taken, as on the Python engine. It waits only while the
 * ring holds an SQE whose completion is to come (uring_out): with none, nothing the kernel
 * has would ever end the wait, and it returns (a bug: SB_CHECK). */
void sb_uring_wait(Engine *e, Req *r)
{
    while (r->state == REQ_ASYNC) {
        struct io_uring_cqe *cqe;
        int err;
        SB_CHECK(e->uring_out > 0, "sb_uring_wait: a request in flight, nothing in the ring");
        if (!e->ring_ok || e->uring_out == 0)
            return;
        /* submitting and waiting apart: a submit_and_wait interrupted by a signal returns
         * the count it submitted, not -EINTR, and the handler would never run */
        sb_uring_submit(e);
        err = io_uring_wait_cqe(&e->ring, &cqe);
        if (err == -EINTR && sb_signalled(e))
            return; /* run() returns as for a stop and raises what the handler raised */
        if (err < 0 && err != -EINTR && err != -EAGAIN && err != -EBUSY)
            return; /* cannot happen with a valid ring: the loop reaps it later */
        sb_uring_reap(e);
    }
}

uint64_t sb_uring_out(Engine *e)
{
    return e->ring_ok ? e->uring_out : 0;
}

/* abandon(): ask the kernel to cancel everything in flight (best effort: a transfer already
 * under way finishes; the ones cancelled complete with -ECANCELED and are dropped). */
void sb_uring_cancel_all(Engine *e)
{
    struct io_uring_sqe *sqe;
    if (!e->ring_ok || (sqe = get_sqe(e)) == NULL)
        return;
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, TAG_CANCEL);
    (void)io_uring_submit(&e->ring);
}

#else /* built without liburing: the constructor refuses AIO_URING, nothing gets here */

int sb_uring_open(Engine *e) { return -ENOSYS; }
void sb_uring_close(Engine *e) {}
void sb_uring_start(Engine *e, Req *r) { sb_finish(e, r, S_IOERR, 0); }
void sb_uring_submit(Engine *e) {}
uint32_t sb_uring_reap(Engine *e) { return 0; }
int sb_uring_ready(Engine *e) { return 0; }
int sb_uring_pending(Engine *e) { return 0; }
void sb_uring_cancel_all(Engine *e) {}
void sb_uring_wait(Engine *e, Req *r) {}
uint64_t sb_uring_out(Engine *e) { return 0; }

#endif
