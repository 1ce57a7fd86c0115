/*
 * The native data path's shared definitions: constants, the Engine object and its parts,
 * the little load/store helpers, and what each file of the engine offers the others.
 *
 * The engine is one split virtqueue served in C (see _splitblk.c for the design): a
 * virtio-blk queue, or one of virtio-net's two queues over a TAP. Its sources, each with one
 * concern:
 *   splitblk_ring.c   driver memory (regions, generations), chain walking, the avail/used
 *                     rings, the in-flight log, the in-flight table and map, interrupts;
 *   splitblk_blk.c    virtio-blk requests: which ones this path takes, serving them inline
 *                     (null, memory, GET_ID, the synchronous file path), completing them;
 *   splitblk_uring.c  the asynchronous file path on io_uring (built with SB_URING only);
 *   splitblk_nbd.c    the NBD client path on libnbd's asynchronous API (SB_NBD only);
 *   splitblk_net.c    virtio-net's receive and transmit queues over a TAP;
 *   splitblk_loop.c   the serving loop: rounds of takes, publishing, sleeping, waiting idle;
 *   _splitblk.c       the Python object and the module.
 * The same sources are compiled three times (pyproject.toml): pyvduse.fastpath._splitblk
 * without liburing, pyvduse.fastpath._splitblk_uring with SB_URING defined and -luring, and
 * pyvduse.fastpath._splitblk_full with SB_URING and SB_NBD, -luring and -lnbd.
 */
#ifndef PYVDUSE_SPLITBLK_H
#define PYVDUSE_SPLITBLK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#ifdef SB_URING
#include <liburing.h>
#endif
#ifdef SB_NBD
#include <libnbd.h>
#endif

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define DESC_ALIGN 16 /* virtio 1.2 2.7: the alignment of each part of a split ring */
#define AVAIL_ALIGN 2
#define USED_ALIGN 4
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

/* The in-flight log (pyvduse/ring/inflight.py): a header (u16 last_avail, u16 base, u32 num,
 * u64 sequence), then an entry per head (u8 state, 7 pad, u64 sequence at its take). */
#define LOG_HEADER 16
#define LOG_LAST_AVAIL 0 /* byte offsets in the header */
#define LOG_BASE 2
#define LOG_NUM 4
#define LOG_SEQ 8
#define LOG_ENTRY 16
#define LOG_ENTRY_STATE 0 /* ... and in an entry */
#define LOG_ENTRY_SEQ 8
#define LOG_FREE 0
#define LOG_IN_FLIGHT 1
#define LOG_COMPLETED 2

#define MAX_SEGS 1024 /* per direction; more goes to the Python path, which splits */
/* A used length is a u32: a chain whose writable buffers total more goes to the Python path,
 * which refuses it (pyvduse/ring/descriptors.py MAX_WRITABLE) */
#define MAX_WRITABLE 0xFFFFFFFFull
#define HIST_BUCKETS 64

/* Copying through the engine's own aligned buffers (direct I/O): a request moves through its
 * buffer at most BOUNCE_CHUNK bytes per step; a buffer larger than BOUNCE_KEEP is freed when
 * its request completes, and no more than BOUNCE_RETAIN bytes stay allocated between
 * requests. So what is allocated is bounded by the requests in flight (num * BOUNCE_CHUNK at
 * the very worst, whatever length the driver's descriptors add up to: the NBD path moves a
 * request that needs a buffer one chunk per command too) and, idle, by BOUNCE_RETAIN. */
#define BOUNCE_CHUNK (1u << 20)
#define BOUNCE_KEEP (256u << 10)
#define BOUNCE_RETAIN (32u << 20)

/* SB_CHECK(cond[, "what"]): a state the engine must never be in (a wait with nothing in
 * flight that could end it, a buffer freed while libnbd holds it, a counter gone wrong). With
 * SB_DEBUG (fuzz/sanitize.sh builds with it) it aborts with the condition, so the fuzzer and
 * the tests see it at once; a release build goes on, and the caller does what keeps it from
 * blocking or writing (returns instead of waiting, leaks instead of freeing). */
#ifdef SB_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define SB_CHECK(cond, ...)                                                                \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "pyvduse native engine: invariant broken: %s (%s:%d)\n", #cond, \
                    __FILE__, __LINE__);                                                   \
            abort();                                                                       \
        }                                                                                  \
    } while (0)
#else
#define SB_CHECK(cond, ...) ((void)0)
#endif

/* RUN_NBD_LOST: the NBD connection is gone; its requests are parked until set_nbd(). */
enum { RUN_STOPPED = 0, RUN_DEFER = 1, RUN_NBD_LOST = 3 };
#define DRAIN_SLEEP 2  /* drain(): the ring is empty with kicks enabled */
#define DRAIN_BUDGET 4 /* drain(): the budget is spent; wait for a kick (or the backoff) */
enum { BACKEND_NULL = 0, BACKEND_FD = 1, BACKEND_MEMORY = 2, BACKEND_NBD = 3, BACKEND_TAP = 4 };
/* What the queue is (DeviceConfig.kind): a virtio-blk queue, or virtio-net's receive or
 * transmit queue (BACKEND_TAP only). */
enum { DEV_BLK = 0, DEV_NET_RX = 1, DEV_NET_TX = 2 };
/* virtio-net: the v1 header every frame starts with (12 bytes with VERSION_1), where its
 * num_buffers field is, and the largest frame a TAP hands over (header, a 64 KiB GSO
 * packet, its Ethernet and VLAN headers: pyvduse/device/net.py MAX_PACKET). */
#define NET_HDR 12
#define NET_NUM_BUFFERS 10
#define NET_MAX_PACKET 65566 /* NET_HDR + 65536 + 18 */
#define NET_IOV_MAX 1024 /* readv/writev take at most this many segments (UIO_MAXIOV) */
enum { AIO_SYNC = 0, AIO_URING = 1, AIO_NBD = 2 };
/* Where a request of the NBD path stands (Req.nbd_state). */
enum { NBD_IDLE = 0, NBD_SENT, NBD_READY, NBD_PARKED };

/* The work a queue does per wakeup (pyvduse/ring/budget.py, the same numbers): at most
 * BUDGET_PER_SLOT * num requests between two kicks of the driver; then it asks for a kick
 * (whatever is pending) and sleeps until one comes or the backoff ends, which doubles from
 * BUDGET_SLEEP_MIN_NS to BUDGET_SLEEP_MAX_NS while no kick comes. A driver that adds work
 * kicks at once; a ring that feeds itself (its used ring, or a buffer, on its avail ring
 * through memory mapped twice) cannot keep the worker from sleeping. */
#define BUDGET_PER_SLOT 4
#define BUDGET_SLEEP_MIN_NS 1000000ull
#define BUDGET_SLEEP_MAX_NS 1000000000ull

/* io_uring user_data of the SQEs that are not requests (requests carry their Req *). */
#define TAG_GATE 1u   /* test-only: the gate read linked before a request */
#define TAG_CANCEL 2u /* abandon()'s cancel of everything in flight */

typedef struct {
    uint64_t start, last;
    uint8_t *base;
    int writable;
} Region;

/* One generation of driver memory: the regions as given, with the buffers that keep them
 * alive. The current one serves new requests; an older one lives on while requests taken
 * under it are in flight (their iovecs and status byte point into it), then is released the
 * next time the engine holds the GIL. */
typedef struct RegionSet {
    Region *regions;
    Py_buffer *views;
    int n;
    int hit;  /* the region found last */
    int refs; /* requests in flight that were taken under this set */
    struct RegionSet *older;
} RegionSet;

/* A request taken and not yet completed, indexed by its head (a head is in flight once). */
enum { REQ_FREE = 0, REQ_INLINE, REQ_ASYNC };
typedef struct {
    int state;
    uint16_t head;
    uint32_t rtype;
    uint64_t sector;
    uint8_t *status;     /* the status byte, in driver memory */
    uint64_t t_take;     /* monotonic ns at take */
    uint64_t take_no;    /* 1-based take number */
    int32_t prev, next;  /* the in-flight list, in take order (heads; -1: none) */
    RegionSet *rs;       /* the memory generation its pointers belong to */
    /* the asynchronous file path */
    int write;           /* OUT (1), IN (0) */
    int bounced;         /* moving through buf, not directly into driver memory */
    uint64_t off, len, done; /* backend offset, data length, bytes moved so far */
    struct iovec *iov;   /* iov[0..niov): the data in driver memory; iov[cap..): a slice */
    int niov, iov_cap;
    uint8_t *buf;        /* the aligned buffer, allocated lazily, kept for the head */
    size_t buf_cap, chunk; /* its size; bytes of the step in flight through it */
    int gates;           /* test-only: times it was linked behind the gate */
    /* the NBD path */
    struct Engine *eng;  /* its engine (a libnbd completion gets only the Req) */
    int nbd_state;       /* NBD_IDLE, _SENT (libnbd has it), _READY (its reply came), _PARKED */
    int nbd_err;         /* the reply's errno (NBD_READY) */
    uint64_t nbd_gen;    /* the connection it was sent on */
    int nbd_holds;       /* commands of it libnbd still holds (0 or 1): until their free
                          * callback, libnbd may write into its memory */
} Req;

typedef struct Engine {
    PyObject_HEAD
    /* driver memory */
    RegionSet *mem_cur; /* new requests and the ring live here */
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
    /* the in-flight map shared with Python: byte [head] is 1 while taken, not completed */
    Py_buffer map_view;
    uint8_t *map;
    /* requests in flight */
    Req *reqs;
    int32_t oldest, newest; /* the in-flight list's ends (heads; -1: empty) */
    volatile uint64_t ninflight; /* taken and not completed */
    uint64_t nasync;   /* of which in io_uring */
    uint64_t taken;    /* requests taken so far */
    uint64_t poison_mark; /* requests taken up to this number complete with IOERR */
    int abandoned;     /* never write driver memory, the log or the map, never interrupt */
    /* the device */
    int dev_kind;          /* DEV_BLK, DEV_NET_RX, DEV_NET_TX */
    int backend, fd, readonly, aio, direct;
    int own_fd;            /* fd is the engine's dup of the file's (BACKEND_FD): closed with it */
    int bounce_all;        /* copy every request (tuning.bounce, or after our own EFAULT) */
    /* the storage's byte saying driver memory cannot be pinned for transfers with it (an
     * EFAULT was seen, by any engine or the Python path): every engine of it copies then */
    Py_buffer unpin_view;
    uint8_t *unpinnable;   /* into unpin_view, or own_unpinnable */
    uint8_t own_unpinnable;
    PyObject *on_unpinnable; /* called by whoever set the byte (Python logs it) */
    uint64_t dio_align;
    Py_buffer mem_view;
    uint8_t *mem;
    uint64_t mem_size;
    Py_buffer cap_view;
    volatile uint64_t *capacity;
    uint8_t serial[ID_BYTES];
    uint8_t *sync_buf;     /* the synchronous path's aligned buffer (direct I/O) */
    size_t bounce_retained; /* bytes of request buffers kept between requests */
    size_t bounce_peak;     /* the most bounce_retained has been (the memory bound's check) */
#ifdef SB_URING
    struct io_uring ring;
#endif
    int ring_ok;        /* the io_uring above exists */
    /* SQEs taken from the ring whose CQE is not reaped yet: what it holds, queued or in the
     * kernel. A wait for a completion with none is a wait for nothing (SB_CHECK). */
    uint64_t uring_out;
    /* the NBD path (splitblk_nbd.c) */
    void *nbd;          /* struct nbd_handle *, NULL while there is no connection */
    PyObject *nbd_owner; /* the binding's NBD object, which keeps the handle open */
    uint64_t nbd_gen;   /* bumped when a connection is lost or replaced */
    int nbd_dead;       /* lost: new requests park; run() returns RUN_NBD_LOST */
    int nbd_fua;        /* writes carry NBD_CMD_FLAG_FUA (the server has FUA, no flush) */
    uint64_t nbd_max;   /* reads and writes longer than this are left to Python */
    uint16_t *nbd_ready; /* heads whose reply came, for the loop to complete (num) */
    uint32_t nready;
    uint64_t nparked;   /* requests waiting for a connection */
    uint32_t nbd_holds; /* commands libnbd holds, over all requests (see Req.nbd_holds) */
    uint64_t nbd_ok;    /* replies without error on the current handle (Python's backoff) */
    uint64_t nbd_kills; /* live handles shut down because a reply said the connection ended */
    int efd;            /* eventfd registered with it: readable when completions arrive */
    /* test-only knobs (see _splitblk.pyi) */
    int gate_fd;
    uint64_t gate_mask;
    uint8_t *gate_buf;  /* 64 bytes the gate reads land in (malloc: see dealloc) */
    uint64_t test_efault;
    int test_serial;    /* each io_uring request is waited for once submitted (in order) */
    /* interrupts and errors */
    int irq_fd;
    unsigned long irq_request;
    uint32_t irq_index;
    int affinity_fd;      /* vqN/irq_cb_affinity, written so interrupts follow us; -1: no */
    uint64_t follow_mask; /* ... when we run on one of these CPUs */
    int irq_cpu;          /* the CPU last written there */
    PyObject *notify, *on_error;
    PyThreadState *ts;    /* while run() or wait_idle() has released the GIL */
    /* control */
    uint64_t poll_ns;    /* after the ring empties, poll it this long before sleeping */
    uint64_t publish_ns; /* publish a round's completions after a request this long */
    uint64_t hold_ns;    /* ... or once the oldest is this old */
    volatile int stop;
    volatile int pause; /* request_pause(): run() returns as for a stop, until resume() */
    /* a Python signal handler raised while run() or wait_idle() waited (the main thread's:
     * Ctrl-C, a test's timeout): they return as for a stop, raising it (held here) */
    int interrupted;
    PyObject *exc_type, *exc_value, *exc_tb;
    int running, closed;
    /* the budget (see BUDGET_PER_SLOT) */
    uint32_t budget, credit; /* requests per kick; left until the next kick */
    uint64_t backoff_ns;     /* the next sleep on a spent budget */
    uint64_t wake_at;        /* while the budget is spent: when it is restored anyway; 0 */
    uint64_t budget_sleeps;  /* times it was spent */
    uint64_t backoff_max_ns; /* the longest backoff_ns has grown (no kick came) */
    uint32_t round_n;        /* chains of the round taken so far, when in_round */
    int in_round;            /* run() returned RUN_DEFER mid-round: the next run() goes on */
    int deferred;            /* run() last returned RUN_DEFER */
    int ready; /* __init__ succeeded: a failed one leaves a half-built engine nothing may run */
    /* counters, written by the serving thread only */
    volatile uint64_t started;      /* t_take of the oldest in flight, 0: none */
    volatile uint64_t oldest_taken; /* take_no of the oldest in flight, 0: none */
    uint64_t completed, latency_ns, hist[HIST_BUCKETS], depth_hist[HIST_BUCKETS];
    uint64_t depth_sum; /* the in-flight counts the depth histogram was fed, added up */
    uint64_t clock; /* now_ns() when the last request completed */
    uint64_t n_in, n_out, n_flush, n_get_id, errors, bytes_read, bytes_written;
    uint64_t bounced, efaults;
    uint64_t inline_done; /* io_uring reads/writes served inline with RWF_NOWAIT instead */
    int nowait;           /* try io_uring's reads and writes inline first (RWF_NOWAIT) */
    int nowait_writes;    /* -1: RWF_NOWAIT writes refused (a block device): inline; 0: untried */
    /* reads: -1 RWF_NOWAIT refused by a file whose data is in memory (tmpfs): inline;
     * -2 refused by another (NFS, FUSE): straight to io_uring; 0 untried or accepted */
    int nowait_reads;
    int resident;         /* the fd is on tmpfs or ramfs: a read never waits for a device */
    /* virtio-net (splitblk_net.c) */
    Py_buffer link_view;
    volatile uint8_t *link; /* 1 while the link is up (ctl link): a byte Python writes */
    int guest_csum;      /* GUEST_CSUM negotiated: received frames keep the TAP's flags */
    int rx_idle;         /* receive: buffers are there and the TAP has no frame: poll it */
    int rx_failed;       /* receive: the TAP's read failed: wait as on a spent budget */
    uint8_t *rx_scratch; /* NET_MAX_PACKET bytes: a frame's tail beyond the buffers */
    uint64_t net_packets, net_bytes, net_drops, net_errors;
    /* scratch of the chain being taken */
    struct iovec rd[MAX_SEGS], wr[MAX_SEGS], tmp[MAX_SEGS];
    int nrd, nwr;
    uint64_t wr_bytes; /* the writable descriptors' lengths added up (at most MAX_WRITABLE) */
} Engine;

/* -- little helpers ------------------------------------------------------------------- */


/* Our own memory (the in-flight log, local copies): little-endian fields at any alignment. */
static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }
static inline void st16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

/* -- driver memory: the one way to read it ---------------------------------------------
 *
 * Every read of memory the driver can write that the engine acts on -- avail ring fields
 * and entries, descriptors in the table and in indirect tables, request headers -- goes
 * through these: relaxed atomic loads (drv_ld*), or volatile byte loads into a local copy
 * (drv_copy, for bytes of any alignment). So each field is fetched exactly once, where the
 * source reads it: with plain loads the compiler may fetch a field again after checking it
 * (to use it), and a driver changing it in between gets past the check (the XSA-155 class
 * of bugs). The atomic loads need natural alignment: the ring areas are checked at setup
 * (sb_check_layout, and sb_map_ring in this process), and an indirect table that is not
 * 8-byte aligned goes to the Python engine. Request data (what an OUT writes, what the
 * memory backend copies) is only copied, never interpreted, so it is read with memcpy.
 * Stores the driver reads (used ring fields, flags, event indices) are single atomic stores
 * too, release for the used index. */
static inline uint16_t drv_ld16(const uint8_t *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
}

static inline uint32_t drv_ld32(const uint8_t *p)
{
    return le32toh(__atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED));
}

static inline uint64_t drv_ld64(const uint8_t *p)
{
    return le64toh(__atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED));
}

static inline uint16_t drv_ld16_acquire(const uint8_t *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE));
}

static inline void drv_copy(uint8_t *dst, const uint8_t *src, size_t n)
{
    const volatile uint8_t *s = src;
    for (size_t k = 0; k < n; k++)
        dst[k] = s[k];
}

static inline void drv_st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELAXED);
}

static inline void drv_st32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, htole32(v), __ATOMIC_RELAXED);
}

static inline void drv_st16_release(uint8_t *p, uint16_t v)
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

static inline int use_uring(const Engine *e) { return e->ring_ok; }

/* Every request of the file backend is copied through the engine's own buffers. */
static inline int sb_copying(const Engine *e)
{
    return e->bounce_all ||
           (e->unpinnable != NULL && __atomic_load_n(e->unpinnable, __ATOMIC_RELAXED));
}

/* -- splitblk_ring.c ------------------------------------------------------------------- */

uint8_t *sb_contiguous(Engine *e, uint64_t iova, uint64_t len, int write);
int sb_visible(const Engine *e, const uint8_t *p);
int sb_walk(Engine *e, uint16_t head);
uint64_t sb_iov_total(const struct iovec *iov, int n);
int sb_iov_slice(const struct iovec *iov, int n, uint64_t off, uint64_t len, struct iovec *out);
void sb_gather_header(const struct iovec *iov, int n, uint8_t *out);
void sb_scatter(const struct iovec *iov, int n, uint64_t off, const uint8_t *src, uint64_t len);
void sb_gather(const struct iovec *iov, int n, uint64_t off, uint8_t *dst, uint64_t len);
void sb_zero(const struct iovec *iov, int n, uint64_t off);
void sb_release_set(RegionSet *rs);
RegionSet *sb_load_regions(PyObject *seq);
int sb_check_layout(Engine *e);
int sb_map_ring(Engine *e);
void sb_collect_sets(Engine *e);
void sb_log_taken(Engine *e, uint16_t head);
void sb_push(Engine *e, uint16_t head, uint32_t written);
void sb_publish(Engine *e);
void sb_follow_cpu(Engine *e);
int sb_pending(Engine *e);
int sb_next_head(Engine *e, uint16_t *head);
void sb_disable_kicks(Engine *e);
int sb_enable_kicks(Engine *e);
void sb_ask_kick(Engine *e);
Req *sb_track(Engine *e, uint16_t head, uint64_t now);
void sb_untrack(Engine *e, Req *r);
int sb_gil_enter(Engine *e);             /* take the GIL if released; 1 if it was */
void sb_gil_leave(Engine *e, int was);  /* ... and release it again */

/* -- splitblk_blk.c -------------------------------------------------------------------- */

int sb_take(Engine *e, uint16_t *head, uint32_t *rtype, uint64_t *sector, uint8_t **status);
int sb_start(Engine *e, uint16_t head, uint32_t rtype, uint64_t sector, uint8_t *status,
             uint64_t now); /* 1: completed inline (at e->clock) */
void sb_finish(Engine *e, Req *r, uint8_t st, uint32_t written);
void sb_complete(Engine *e, Req *r, uint32_t used); /* its latency, then its used element */
void sb_report_error(Engine *e, uint32_t rtype, uint64_t sector, int err);
void sb_unpinnable(Engine *e); /* a transfer with driver memory failed with EFAULT */
int sb_fake_efault(Engine *e); /* test-only: 1 if this transfer is to fail with EFAULT */
int sb_aligned(const Engine *e, const struct iovec *iov, int n);
int sb_buffer(Engine *e, Req *r, size_t size);
void sb_buffer_done(Engine *e, Req *r);

/* -- splitblk_uring.c (stubs without SB_URING) --------------------------------------------- */

int sb_uring_open(Engine *e); /* 0, or -errno */
void sb_uring_close(Engine *e);
void sb_uring_start(Engine *e, Req *r); /* submit (prepare) r's first step */
void sb_uring_submit(Engine *e);
uint32_t sb_uring_reap(Engine *e); /* completions handled */
int sb_uring_ready(Engine *e);     /* completions waiting to be reaped */
int sb_uring_pending(Engine *e);   /* SQEs prepared that the kernel has not taken */
void sb_uring_cancel_all(Engine *e);
void sb_uring_wait(Engine *e, Req *r); /* test_serial: until r has completed */
uint64_t sb_uring_out(Engine *e);      /* SQEs whose CQE is to come (queued or in the kernel) */

/* -- splitblk_nbd.c (stubs without SB_NBD) ------------------------------------------------ */

int sb_nbd_set(Engine *e, PyObject *handle); /* with the GIL, not running; -1: exception */
void sb_nbd_release(Engine *e);               /* with the GIL */
void sb_nbd_start(Engine *e, Req *r);         /* send r's command, or park it */
uint32_t sb_nbd_reap(Engine *e);              /* complete the requests whose reply came */
int sb_nbd_ready(Engine *e);                  /* replies waiting to be reaped */
int sb_nbd_poll_fd(Engine *e, short *events); /* the socket to poll (and for what), or -1 */
void sb_nbd_notify(Engine *e, short revents); /* tell libnbd what the socket is ready for */
void sb_nbd_pump(Engine *e);                  /* read what has arrived, without blocking */
void sb_nbd_fail_parked(Engine *e, int drop); /* IOERR (or dropped) for every parked one */
void sb_nbd_resend(Engine *e);                /* after set_nbd(): send the parked ones */

/* -- splitblk_net.c -------------------------------------------------------------------- */

int sb_net_serve(Engine *e, uint64_t now); /* 1 served (at e->clock), 0 idle, -1 Python's */

/* -- splitblk_loop.c ------------------------------------------------------------------- */

void sb_run_start(Engine *e, int fresh);               /* before sb_run */
int sb_run(Engine *e, int kick_fd, int stop_fd);       /* without the GIL */
uint64_t sb_wait_idle(Engine *e, uint64_t timeout_ns); /* without the GIL */
int sb_signalled(Engine *e); /* after EINTR: Python's handlers ran; 1 if one raised */

#endif
