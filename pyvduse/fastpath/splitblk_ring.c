/*
 * The ring side of the native data path: driver memory, descriptor chains, the avail and
 * used rings, the in-flight log, and the table of requests in flight.
 *
 * Driver memory comes as regions (start, last, buffer, writable), sorted and disjoint; every
 * pointer into it this engine ever forms comes from sb_contiguous or add_segments, which
 * refuse anything outside a region (or read-only when writing). A generation of regions is a
 * RegionSet; set_regions makes a new one current and the old one lives on until the
 * requests taken under it have completed.
 *
 * Layouts (all little-endian, virtio 1.2 section 2.7): descriptor {u64 addr, u32 len,
 * u16 flags, u16 next}; avail {u16 flags, u16 idx, u16 ring[num], u16 used_event}; used
 * {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}. The in-flight log is the
 * one of pyvduse/ring/inflight.py: header {u16 last_avail, u16 base, u32 num, u64 seq},
 * then per head {u8 state, 7 pad, u64 seq}; a head is IN_FLIGHT from its take, COMPLETED
 * from its push (whatever the order requests complete in) and FREE once published, and
 * `base` is the used index at the first push of the batch not yet published.
 */
#include "splitblk.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* -- driver memory -------------------------------------------------------------------- */

static Region *find_region(Engine *e, uint64_t iova)
{
    RegionSet *rs = e->mem_cur;
    Region *r;
    int lo = 0, hi = rs->n - 1;
    if (rs->hit >= 0) {
        r = &rs->regions[rs->hit];
        if (r->start <= iova && iova <= r->last)
            return r;
    }
    while (lo <= hi) { /* regions are sorted and disjoint */
        int mid = (lo + hi) / 2;
        r = &rs->regions[mid];
        if (iova < r->start)
            hi = mid - 1;
        else if (iova > r->last)
            lo = mid + 1;
        else {
            rs->hit = mid;
            return r;
        }
    }
    return NULL;
}

/* A pointer to [iova, iova+len) inside one region, or NULL. */
uint8_t *sb_contiguous(Engine *e, uint64_t iova, uint64_t len, int write)
{
    Region *r;
    if (len == 0 || iova > UINT64_MAX - (len - 1))
        return NULL;
    r = find_region(e, iova);
    if (r == NULL || (write && !r->writable) || iova + (len - 1) > r->last)
        return NULL;
    return r->base + (iova - r->start);
}

/* Whether p points into the current memory (not into a region dropped by a remap: its
 * pages were fenced, nothing written there reaches the driver). */
int sb_visible(const Engine *e, const uint8_t *p)
{
    const RegionSet *rs = e->mem_cur;
    int i;
    for (i = 0; i < rs->n; i++) {
        const Region *r = &rs->regions[i];
        if (p >= r->base && (uint64_t)(p - r->base) <= r->last - r->start)
            return 1;
    }
    return 0;
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

void sb_release_set(RegionSet *rs)
{
    if (rs == NULL)
        return;
    for (int k = 0; k < rs->n; k++)
        PyBuffer_Release(&rs->views[k]);
    PyMem_Free(rs->regions);
    PyMem_Free(rs->views);
    PyMem_Free(rs);
}

/* regions: a sequence of (start, last, buffer, writable), sorted and disjoint. A new set
 * (refs 0, nothing older), or NULL with an exception. */
RegionSet *sb_load_regions(PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "regions must be a sequence");
    RegionSet *rs;
    Py_ssize_t n;
    if (fast == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    rs = PyMem_Calloc(1, sizeof *rs);
    if (rs == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    rs->hit = -1;
    rs->regions = PyMem_Calloc(n ? n : 1, sizeof(Region));
    rs->views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (rs->regions == NULL || rs->views == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, k), *buf;
        unsigned long long start, last;
        int writable;
        Region *r = &rs->regions[k];
        if (!PyArg_ParseTuple(item, "KKOp", &start, &last, &buf, &writable))
            goto fail;
        if (PyObject_GetBuffer(buf, &rs->views[k], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            goto fail;
        rs->n = (int)k + 1;
        /* len - 1 against last - start: a region spanning the whole 64-bit space would make
         * last - start + 1 wrap to 0 and pass for an empty buffer */
        if (last < start || rs->views[k].len <= 0 ||
            (unsigned long long)(rs->views[k].len - 1) != last - start ||
            (k > 0 && start <= rs->regions[k - 1].last)) {
            PyErr_SetString(PyExc_ValueError,
                            "regions must be sorted, disjoint and match their buffers");
            goto fail;
        }
        r->start = start;
        r->last = last;
        r->base = rs->views[k].buf;
        r->writable = writable;
    }
    Py_DECREF(fast);
    return rs;
fail:
    Py_DECREF(fast);
    sb_release_set(rs);
    return NULL;
}

/* Release the older generations no request in flight uses any more (with the GIL). */
void sb_collect_sets(Engine *e)
{
    RegionSet **link;
    if (e->mem_cur == NULL)
        return;
    link = &e->mem_cur->older;
    while (*link != NULL) {
        RegionSet *rs = *link;
        if (rs->refs == 0) {
            *link = rs->older;
            sb_release_set(rs);
        } else {
            link = &rs->older;
        }
    }
}

/* The ring's three parts: IOVA, size (virtio 1.2 2.7.6 and 2.7.8: the event-idx fields
 * only when negotiated) and the alignment 2.7 requires. */
static void ring_areas(const Engine *e, uint64_t iova[3], uint64_t size[3], uint64_t align[3])
{
    uint64_t extra = e->event_idx ? 2 : 0;
    iova[0] = e->desc_iova;
    size[0] = 16ull * e->num;
    align[0] = DESC_ALIGN;
    iova[1] = e->avail_iova;
    size[1] = 4 + 2ull * e->num + extra;
    align[1] = AVAIL_ALIGN;
    iova[2] = e->used_iova;
    size[2] = 4 + 8ull * e->num + extra;
    align[2] = USED_ALIGN;
}

/* The checks of pyvduse/ring/areas.py: each part aligned and inside the IOVA space, no two
 * overlapping (a used ring on the avail ring would make every completion the next request). */
int sb_check_layout(Engine *e)
{
    static const char *names[3] = {"descriptor table", "avail ring", "used ring"};
    uint64_t iova[3], size[3], align[3];
    ring_areas(e, iova, size, align);
    for (int k = 0; k < 3; k++) {
        if (iova[k] % align[k]) {
            PyErr_Format(PyExc_ValueError, "the %s (0x%llx) is not %d-byte aligned", names[k],
                         (unsigned long long)iova[k], (int)align[k]);
            return -1;
        }
        if (iova[k] > UINT64_MAX - (size[k] - 1)) {
            PyErr_Format(PyExc_ValueError, "the %s runs past the end of the IOVA space",
                         names[k]);
            return -1;
        }
    }
    for (int a = 0; a < 3; a++)
        for (int b = a + 1; b < 3; b++)
            if (iova[a] <= iova[b] + (size[b] - 1) && iova[b] <= iova[a] + (size[a] - 1)) {
                PyErr_Format(PyExc_ValueError, "ring areas overlap: the %s and the %s",
                             names[a], names[b]);
                return -1;
            }
    return 0;
}

/* Point at the ring's three parts inside the current regions. They must be aligned in this
 * process too: their words are read and written with single (atomic) accesses. */
int sb_map_ring(Engine *e)
{
    uint64_t iova[3], size[3], align[3];
    uint8_t *p[3];
    ring_areas(e, iova, size, align);
    for (int k = 0; k < 3; k++) {
        p[k] = sb_contiguous(e, iova[k], size[k], k == 2);
        if (p[k] == NULL) {
            PyErr_SetString(PyExc_ValueError, "ring not inside the regions given");
            return -1;
        }
        if ((uintptr_t)p[k] % align[k]) {
            PyErr_SetString(PyExc_ValueError, "ring memory is not aligned in this process");
            return -1;
        }
    }
    e->desc = p[0];
    e->avail = p[1];
    e->used = p[2];
    return 0;
}

/* -- the chain ------------------------------------------------------------------------ */

static int add_desc(Engine *e, uint64_t addr, uint32_t len, uint16_t flags)
{
    if (flags & DESC_F_WRITE) {
        if ((e->wr_bytes += len) > MAX_WRITABLE)
            return -1;
        return add_segments(e, addr, len, 1, e->wr, &e->nwr);
    }
    if (e->nwr) /* readable after writable */
        return -1;
    return add_segments(e, addr, len, 0, e->rd, &e->nrd);
}

/* Walk the chain at head into e->rd / e->wr; -1: leave it to the Python path. */
int sb_walk(Engine *e, uint16_t head)
{
    uint32_t i = head, count = 0;
    e->nrd = e->nwr = 0;
    e->wr_bytes = 0;
    for (;;) {
        const uint8_t *d;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        if (++count > e->num)
            return -1;
        d = e->desc + 16u * i;
        addr = drv_ld64(d);
        len = drv_ld32(d + 8);
        flags = drv_ld16(d + 12);
        next = drv_ld16(d + 14);
        if (flags & DESC_F_INDIRECT) {
            const uint8_t *table;
            uint32_t n, j = 0, budget = e->num - count + 1, used = 0;
            if (!e->indirect || (flags & DESC_F_NEXT) || len == 0 || len % 16 ||
                len / 16 > e->num)
                return -1;
            table = sb_contiguous(e, addr, len, 0);
            if (table == NULL || (uintptr_t)table % 8) /* drv_ld64 needs it aligned */
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
                taddr = drv_ld64(t);
                tlen = drv_ld32(t + 8);
                tflags = drv_ld16(t + 12);
                tnext = drv_ld16(t + 14);
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

uint64_t sb_iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int k = 0; k < n; k++)
        t += iov[k].iov_len;
    return t;
}

/* The segments covering bytes [off, off+len) of iov, into out (at most n of them). */
int sb_iov_slice(const struct iovec *iov, int n, uint64_t off, uint64_t len, struct iovec *out)
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
void sb_gather_header(const struct iovec *iov, int n, uint8_t *out)
{
    struct iovec parts[OUTHDR_SIZE]; /* every segment holds at least one byte */
    int m = sb_iov_slice(iov, n < OUTHDR_SIZE ? n : OUTHDR_SIZE, 0, OUTHDR_SIZE, parts);
    for (int k = 0; k < m; k++) {
        drv_copy(out, parts[k].iov_base, parts[k].iov_len);
        out += parts[k].iov_len;
    }
}

/* Bytes [off, off+len) of the concatenation of iov, from src / into dst. */
void sb_scatter(const struct iovec *iov, int n, uint64_t off, const uint8_t *src, uint64_t len)
{
    for (int k = 0; k < n && len; k++) {
        size_t l = iov[k].iov_len, take;
        if (off >= l) {
            off -= l;
            continue;
        }
        take = l - off < len ? l - off : len;
        memcpy((uint8_t *)iov[k].iov_base + off, src, take);
        src += take;
        len -= take;
        off = 0;
    }
}

void sb_gather(const struct iovec *iov, int n, uint64_t off, uint8_t *dst, uint64_t len)
{
    for (int k = 0; k < n && len; k++) {
        size_t l = iov[k].iov_len, take;
        if (off >= l) {
            off -= l;
            continue;
        }
        take = l - off < len ? l - off : len;
        memcpy(dst, (const uint8_t *)iov[k].iov_base + off, take);
        dst += take;
        len -= take;
        off = 0;
    }
}

/* Zero the concatenation of iov from byte off to its end (a read past the end of a file). */
void sb_zero(const struct iovec *iov, int n, uint64_t off)
{
    for (int k = 0; k < n; k++) {
        size_t l = iov[k].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        memset((uint8_t *)iov[k].iov_base + off, 0, l - off);
        off = 0;
    }
}

/* -- requests in flight --------------------------------------------------------------- */

static void oldest_changed(Engine *e)
{
    if (e->oldest < 0) {
        e->started = 0;
        e->oldest_taken = 0;
    } else {
        e->started = e->reqs[e->oldest].t_take;
        e->oldest_taken = e->reqs[e->oldest].take_no;
    }
}

/* A head just taken: into the table, the map and the list (newest last). */
Req *sb_track(Engine *e, uint16_t head, uint64_t now)
{
    Req *r = &e->reqs[head];
    r->state = REQ_INLINE;
    r->head = head;
    r->t_take = now;
    r->take_no = e->taken + 1;
    __atomic_store_n(&e->taken, r->take_no, __ATOMIC_RELAXED); /* poison_in_flight reads it */
    r->rs = e->mem_cur;
    r->rs->refs++;
    r->bounced = 0;
    r->done = 0;
    r->gates = 0;
    r->prev = e->newest;
    r->next = -1;
    if (e->newest >= 0)
        e->reqs[e->newest].next = head;
    else
        e->oldest = head;
    e->newest = head;
    e->map[head] = 1;
    e->ninflight++;
    e->depth_hist[bit_length(e->ninflight) & (HIST_BUCKETS - 1)]++;
    e->depth_sum += e->ninflight;
    if (e->oldest == head)
        oldest_changed(e);
    return r;
}

/* A request completed (or dropped): out of the table, the map and the list. */
void sb_untrack(Engine *e, Req *r)
{
    int was_oldest = e->oldest == r->head;
    if (r->prev >= 0)
        e->reqs[r->prev].next = r->next;
    else
        e->oldest = r->next;
    if (r->next >= 0)
        e->reqs[r->next].prev = r->prev;
    else
        e->newest = r->prev;
    r->prev = r->next = -1;
    if (!e->abandoned)
        e->map[r->head] = 0;
    r->rs->refs--;
    r->rs = NULL;
    r->state = REQ_FREE;
    e->ninflight--;
    if (was_oldest)
        oldest_changed(e);
}

/* -- the ring and the log ------------------------------------------------------------- */

static inline uint8_t *log_entry(Engine *e, uint16_t head)
{
    return e->log + LOG_HEADER + LOG_ENTRY * head;
}

void sb_log_taken(Engine *e, uint16_t head)
{
    uint8_t *ent;
    if (e->log == NULL)
        return;
    e->seq++;
    ent = log_entry(e, head);
    ent[LOG_ENTRY_STATE] = LOG_IN_FLIGHT;
    st64(ent + LOG_ENTRY_SEQ, e->seq);
    st16(e->log + LOG_LAST_AVAIL, e->last_avail);
    st64(e->log + LOG_SEQ, e->seq);
}

/* Write a used element (not yet visible: see sb_publish). */
void sb_push(Engine *e, uint16_t head, uint32_t written)
{
    uint8_t *elem;
    if (e->abandoned)
        return;
    if (e->nbatch >= e->num) /* only a driver re-offering unpublished heads gets here */
        sb_publish(e);
    elem = e->used + 4 + 8u * (e->used_idx % e->num);
    if (e->log != NULL) {
        if (e->nbatch == 0)
            st16(e->log + LOG_BASE, e->used_idx); /* the batch's base */
        log_entry(e, head)[LOG_ENTRY_STATE] = LOG_COMPLETED;
    }
    e->batch[e->nbatch++] = head;
    drv_st32(elem, head);
    drv_st32(elem + 4, written);
    e->used_idx++;
}

int sb_gil_enter(Engine *e)
{
    PyThreadState *ts = e->ts;
    if (ts == NULL)
        return 0;
    e->ts = NULL;
    PyEval_RestoreThread(ts);
    return 1;
}

void sb_gil_leave(Engine *e, int was)
{
    if (was)
        e->ts = PyEval_SaveThread();
}

static void interrupt(Engine *e)
{
    if (e->irq_fd >= 0) {
        uint32_t index = e->irq_index;
        (void)ioctl(e->irq_fd, e->irq_request, &index); /* EINVAL while resetting: fine */
    } else if (e->notify != NULL) {
        PyObject *res;
        int was = sb_gil_enter(e);
        res = PyObject_CallFunction(e->notify, "I", e->irq_index);
        if (res == NULL)
            PyErr_WriteUnraisable(e->notify);
        Py_XDECREF(res);
        sb_gil_leave(e, was);
    }
}

/* --irq-cpus follow: point the queue's interrupt work at the CPU this loop runs on (one of
 * the driver's for this queue), so that it lands where the device's own work does and not on
 * the application's CPU. Written only when the scheduler moved us; a write the kernel refuses
 * stops the following. */
void sb_follow_cpu(Engine *e)
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

/* Make pushed completions visible, free their log entries, interrupt if the driver asked
 * (at most one interrupt per publish, with the event-idx rule). */
void sb_publish(Engine *e)
{
    uint16_t new_idx = e->used_idx, old = e->signalled;
    int need;
    if (e->abandoned)
        return;
    drv_st16_release(e->used + 2, new_idx);
    if (e->log != NULL)
        for (uint32_t k = 0; k < e->nbatch; k++)
            log_entry(e, e->batch[k])[LOG_ENTRY_STATE] = LOG_FREE;
    e->nbatch = 0;
    if (new_idx == old)
        return;
    e->signalled = new_idx;
    if (e->event_idx) {
        uint16_t ev;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ev = drv_ld16_acquire(e->avail + 4 + 2 * e->num);
        need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        need = !(drv_ld16_acquire(e->avail) & AVAIL_F_NO_INTERRUPT);
    }
    if (need)
        interrupt(e);
}

/* The head of the next chain made available, not taken: 1 (*head set), 0 the ring is
 * empty, -1 leave it to Python: the index ran away, the head is out of range or still in
 * flight (a driver offering it again: Python's ring breaks the queue with the message). */
int sb_next_head(Engine *e, uint16_t *head)
{
    uint16_t h;
    if (e->last_avail == e->avail_seen) {
        int p = sb_pending(e);
        if (p <= 0)
            return p;
    }
    h = drv_ld16(e->avail + 4 + 2 * (e->last_avail % e->num));
    if (h >= e->num || e->map[h])
        return -1;
    *head = h;
    return 1;
}

/* Chains made available and not taken; -1 when the index ran away (the Python path breaks
 * the queue with the message). */
int sb_pending(Engine *e)
{
    uint16_t seen = drv_ld16_acquire(e->avail + 2);
    uint16_t n = (uint16_t)(seen - e->last_avail);
    if (n > e->num)
        return -1;
    e->avail_seen = seen;
    return n;
}

void sb_disable_kicks(Engine *e)
{
    if (!e->event_idx)
        drv_st16(e->used, USED_F_NO_NOTIFY);
}

/* A spent budget: ask the driver to kick at its next addition, whatever is pending now
 * (ring/split.py ask_for_kick). */
void sb_ask_kick(Engine *e)
{
    if (e->event_idx)
        drv_st16(e->used + 4 + 8 * e->num, drv_ld16_acquire(e->avail + 2));
    else
        drv_st16(e->used, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

int sb_enable_kicks(Engine *e)
{
    if (e->event_idx)
        drv_st16(e->used + 4 + 8 * e->num, e->last_avail);
    else
        drv_st16(e->used, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return sb_pending(e);
}
