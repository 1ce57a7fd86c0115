/*
 * The serving loop of the native engine, run without the GIL: rounds of takes, publishing,
 * sleeping until a kick, a completion or a stop, and waiting for requests in flight.
 *
 * A round: reap the completions that arrived (aio=AIO_URING, or NBD replies), take every
 * chain this path can serve (at most num), serving the inline ones and preparing an SQE (or
 * sending an NBD command) for the others, submit the round's SQEs with one io_uring_submit,
 * reap again (some complete during the submit), and publish what was pushed: one store of the used index and at most one interrupt per
 * publish. Inline requests keep the publish rule (publish_ns / hold_ns, pyvduse/runtime/
 * tuning.py): the completions of a round go out together unless one took publish_ns or the
 * oldest unpublished one has waited hold_ns; completions from io_uring go out with the round
 * that reaped them, so none waits for more than the next wake-up. With NBD the socket is
 * polled beside the kick and stop fds (for writing too while libnbd has bytes it could not
 * send), and read once per round without waiting; a lost connection with requests parked
 * returns RUN_NBD_LOST. A virtio-net receive queue whose buffers wait for a frame sleeps on
 * its TAP instead of a kick (splitblk_net.c).
 *
 * The budget (splitblk.h, BUDGET_PER_SLOT): every chain taken, or left to Python, spends one
 * credit; a kick restores them. Spent, the loop publishes, asks the driver for a kick and
 * sleeps until it comes (or the backoff ends), still reaping io_uring and NBD completions. A
 * round left for Python (RUN_DEFER) goes on at the next run(): the deferred chain counts in
 * it, as in the Python worker's round, so both engines write the ring in the same steps.
 */
#include "splitblk.h"

#include <errno.h>
#include <poll.h>
#include <unistd.h>

/* With kicks still off, watch the avail index (and the completion ring) for up to poll_ns:
 * 1 when there is work (serve it with no kick and no wake-up), 0 when the time ran out. */
static int poll_for_work(Engine *e)
{
    uint64_t deadline = now_ns() + e->poll_ns;
    for (unsigned spins = 0;; spins++) {
        if (drv_ld16_acquire(e->avail + 2) != e->last_avail || sb_uring_ready(e) ||
            sb_nbd_ready(e))
            return 1;
        if (e->stop || e->pause || e->interrupted)
            return 0;
        if ((spins & 63) == 63 && now_ns() >= deadline)
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

/* Submit what is prepared and push what has completed. */
static void settle(Engine *e)
{
    if (e->backend == BACKEND_NBD) { /* commands went out as they were taken */
        sb_nbd_pump(e);
        sb_nbd_reap(e);
        return;
    }
    if (!use_uring(e))
        return;
    sb_uring_submit(e);
    if (sb_uring_reap(e))
        sb_uring_submit(e); /* the rest of short transfers, retries */
}

/* Serve until the ring is empty with kicks re-enabled (DRAIN_SLEEP), a stop is asked
 * (RUN_STOPPED), or a chain is left to Python (RUN_DEFER); everything pushed is published
 * when it returns. */
static int drain(Engine *e)
{
    for (;;) {
        uint32_t n = 0;
        uint64_t published;
        int r = DRAIN_SLEEP;
        uint64_t t;
        if (e->in_round) { /* the round Python took a chain of goes on */
            n = e->round_n;
            e->in_round = 0;
        } else if (e->credit == 0) { /* spent: completions only, the kick stays asked for */
            settle(e);
            sb_publish(e);
            return e->nbd_dead && e->nparked ? RUN_NBD_LOST : DRAIN_BUDGET;
        } else {
            sb_disable_kicks(e);
        }
        if (use_uring(e))
            sb_uring_reap(e);
        sb_nbd_reap(e);
        t = published = now_ns();
        while (n < e->num) {
            uint16_t head;
            uint32_t rtype;
            uint64_t sector, done;
            uint8_t *status;
            int k;
            if (e->stop || e->pause || e->interrupted) {
                r = RUN_STOPPED;
                break;
            }
            if (e->credit == 0) {
                r = DRAIN_BUDGET;
                break;
            }
            k = e->dev_kind == DEV_BLK ? sb_take(e, &head, &rtype, &sector, &status)
                                       : sb_net_serve(e, t);
            if (k < 0) { /* Python takes it, in this round and on this budget */
                r = RUN_DEFER;
                e->credit--;
                e->round_n = n + 1;
                e->in_round = 1;
                break;
            }
            if (k == 0)
                break;
            e->credit--;
            /* taken when the one before ended: one clock read per request (virtio-net's
             * are served at once) */
            done = e->dev_kind != DEV_BLK || sb_start(e, head, rtype, sector, status, t)
                       ? e->clock
                       : now_ns();
            n++;
            if (done - t >= e->publish_ns || done - published >= e->hold_ns) {
                sb_publish(e);
                published = done;
            }
            t = done;
        }
        settle(e);
        sb_publish(e);
        if (r != DRAIN_SLEEP)
            return r;
        if (e->nbd_dead && e->nparked)
            return RUN_NBD_LOST; /* Python reconnects, then set_nbd() sends them again */
        if (n < e->num) {
            int p;
            if (e->rx_idle) /* buffers wait for a frame: the TAP wakes us, kicks stay off */
                return DRAIN_SLEEP;
            if (e->rx_failed) { /* the TAP failed: try again at a kick or after the backoff */
                e->rx_failed = 0;
                e->credit = 0;
                return DRAIN_BUDGET;
            }
            if (e->poll_ns && poll_for_work(e))
                continue;
            p = sb_enable_kicks(e);
            if (p < 0)
                return RUN_DEFER;
            if (p == 0)
                return DRAIN_SLEEP;
        }
    }
}

/* The budget back: a kick (the driver is there) also resets the backoff, which otherwise
 * doubles. */
static void restore_credit(Engine *e, int kicked)
{
    e->credit = e->budget;
    e->wake_at = 0;
    if (kicked)
        e->backoff_ns = BUDGET_SLEEP_MIN_NS;
    else if ((e->backoff_ns *= 2) > BUDGET_SLEEP_MAX_NS)
        e->backoff_ns = BUDGET_SLEEP_MAX_NS;
    if (e->backoff_ns > e->backoff_max_ns)
        e->backoff_max_ns = e->backoff_ns;
}

/* poll(2)'s timeout: until the budget comes back (-1: none pending), at most 1 ms while SQEs
 * wait for room in the kernel. */
static int sleep_ms(Engine *e)
{
    int timeout = -1;
    if (e->wake_at) {
        uint64_t now = now_ns();
        timeout = now >= e->wake_at ? 0 : (int)((e->wake_at - now + 999999) / 1000000);
    }
    /* SQEs the kernel would not take yet (EAGAIN, EBUSY) wake nobody: retry soon */
    if (sb_uring_pending(e) && (timeout < 0 || timeout > 1))
        timeout = 1;
    return timeout;
}

void sb_run_start(Engine *e, int fresh)
{
    if (fresh) { /* not the same wakeup going on after RUN_DEFER */
        e->in_round = 0;
        restore_credit(e, 1);
    }
}

int sb_run(Engine *e, int kick_fd, int stop_fd)
{
    struct pollfd fds[3];
    nfds_t nfds = 2;
    int r;
    fds[0].fd = kick_fd;
    fds[0].events = POLLIN;
    fds[1].fd = stop_fd;
    fds[1].events = POLLIN;
    if (use_uring(e)) {
        fds[2].fd = e->efd;
        fds[2].events = POLLIN;
        nfds = 3;
    }
    sb_follow_cpu(e);
    r = drain(e);
    while (r == DRAIN_SLEEP || r == DRAIN_BUDGET) {
        uint64_t junk;
        if (r == DRAIN_BUDGET && e->wake_at == 0) {
            sb_ask_kick(e);
            e->wake_at = now_ns() + e->backoff_ns;
            e->budget_sleeps++;
        }
        if (e->stop || e->pause || e->interrupted) {
            r = RUN_STOPPED;
            break;
        }
        if (e->backend == BACKEND_NBD) { /* the socket, for what libnbd waits for now */
            fds[2].fd = sb_nbd_poll_fd(e, &fds[2].events);
            nfds = fds[2].fd >= 0 ? 3 : 2;
        } else if (e->dev_kind == DEV_NET_RX) { /* the TAP, while buffers wait for a frame */
            fds[2].fd = e->fd;
            fds[2].events = POLLIN;
            nfds = e->rx_idle ? 3 : 2;
        }
        for (nfds_t k = 0; k < nfds; k++)
            fds[k].revents = 0;
        if (poll(fds, nfds, sleep_ms(e)) < 0) {
            if (errno == EINTR && !sb_signalled(e))
                continue;
            r = RUN_STOPPED; /* a handler raised (run() raises it), or invalid fds */
            break;
        }
        if (fds[1].revents) {
            r = RUN_STOPPED;
            break;
        }
        if (fds[0].revents & POLLIN) {
            (void)!read(kick_fd, &junk, sizeof junk);
            restore_credit(e, 1);
        } else if (e->wake_at && now_ns() >= e->wake_at) {
            restore_credit(e, 0);
        }
        if (e->backend == BACKEND_NBD) {
            if (nfds == 3 && fds[2].revents)
                sb_nbd_notify(e, fds[2].revents);
        } else if (use_uring(e) && nfds == 3 && (fds[2].revents & POLLIN)) {
            (void)!read(e->efd, &junk, sizeof junk); /* before reaping: none is missed */
        }
        sb_follow_cpu(e);
        r = drain(e);
    }
    return r;
}

uint64_t sb_wait_idle(Engine *e, uint64_t timeout_ns)
{
    uint64_t start = now_ns();
    uint64_t deadline = timeout_ns > UINT64_MAX - start ? UINT64_MAX : start + timeout_ns;
    for (;;) {
        struct pollfd p;
        struct timespec ts;
        uint64_t t, wait;
        int n;
        settle(e);
        if (e->nbatch)
            sb_publish(e);
        /* parked NBD requests wait for a connection, which only Python can bring */
        if (e->nasync <= e->nparked || e->interrupted || (t = now_ns()) >= deadline)
            break;
        /* io_uring requests end only in a CQE: with no SQE whose CQE is to come, nothing
         * would end this wait (a bug), so it does not wait */
        SB_CHECK(e->backend == BACKEND_NBD || sb_uring_out(e) > 0,
                 "wait_idle: requests in flight, nothing in the ring");
        if (e->backend != BACKEND_NBD && sb_uring_out(e) == 0)
            break;
        wait = deadline - t;
        if (sb_uring_pending(e) && wait > 1000000)
            wait = 1000000;
        ts.tv_sec = (time_t)(wait / 1000000000u);
        ts.tv_nsec = (long)(wait % 1000000000u);
        p.fd = e->efd;
        p.events = POLLIN;
        if (e->backend == BACKEND_NBD)
            p.fd = sb_nbd_poll_fd(e, &p.events);
        p.revents = 0;
        n = ppoll(&p, 1, &ts, NULL);
        if (n > 0) {
            uint64_t junk;
            if (e->backend == BACKEND_NBD)
                sb_nbd_notify(e, p.revents);
            else
                (void)!read(e->efd, &junk, sizeof junk);
        } else if (n < 0 && errno == EINTR && sb_signalled(e)) {
            break;
        }
    }
    return e->ninflight;
}

/* A signal cut a wait short: run Python's signal handlers now, as Python's own blocking
 * calls do (they run on the main thread only: Ctrl-C, a test's timeout; elsewhere this is
 * a no-op). 1 when one raised: the exception is held for run() or wait_idle() to raise, and
 * the loop returns as for a stop. Needs the GIL released by run() or wait_idle(). */
int sb_signalled(Engine *e)
{
    int was;
    if (e->interrupted || e->ts == NULL)
        return e->interrupted;
    was = sb_gil_enter(e);
    if (PyErr_CheckSignals() < 0) {
        PyErr_Fetch(&e->exc_type, &e->exc_value, &e->exc_tb);
        e->interrupted = 1;
    }
    sb_gil_leave(e, was);
    return e->interrupted;
}
