/*
 * virtio-net over a TAP in the native data path: the transmit queue (each chain one frame,
 * written to the TAP as it is) and the receive queue (each frame the TAP has, read straight
 * into the next receive buffer). The same steps as pyvduse/device/net.py's NetDevice.transmit
 * and ReceiveQueue.receive without mergeable buffers (with them the device keeps the Python
 * engine), over a TAP opened with IFF_VNET_HDR and a 12-byte header, so the driver's v1
 * header, offload requests and all, passes through both ways.
 *
 * Transmit: a well-formed chain (readable only, at least a header) is taken, written with
 * one writev (from driver memory, no copy of ours) and completed with a used length of 0;
 * while the link is down (ctl link down) it is dropped. What the TAP refuses is dropped
 * too (counted): a network device loses frames, it does not fail requests.
 *
 * Receive: the next receive buffer is walked but not taken, and the TAP read into it (with
 * a scratch buffer after it, so that a frame longer than the buffer is seen whole). Only
 * when a frame came and fits is the buffer taken, its header's num_buffers set to 1 (and
 * its flags cleared without GUEST_CSUM) and completed with the frame's length, all at once:
 * a buffer is never held taken and empty, so a stop, a remap or a crash finds none in
 * flight. No frame (EAGAIN): the buffer stays on the ring and the loop sleeps on the TAP
 * (rx_idle) with kicks off; no buffer: it sleeps on a kick. A frame longer than the buffer
 * is dropped, as is every frame while the link is down. A chain this path does not take
 * (malformed, memory not mapped, more segments than it handles) is left to Python (-1).
 * Received frames are handed over once per round (engine.py sets publish_ns so). A
 * --poll-us that waited for the TAP's next frame before handing them over was measured and
 * dropped: 64-byte UDP into the interface fell from 0.20x veth to 0.13-0.14x with 100 and
 * 500 us, TCP moved within the runs' noise.
 */
#include "splitblk.h"

#include <errno.h>
#include <unistd.h>

/* The next avail chain, walked into e->rd / e->wr and not taken: 1 (*head set), 0 the
 * ring is empty, -1 leave it to Python (sb_next_head's rules, or a chain sb_walk refuses). */
static int peek(Engine *e, uint16_t *head)
{
    int k = sb_next_head(e, head);
    return k <= 0 ? k : sb_walk(e, *head) < 0 ? -1 : 1;
}

/* Take the chain peek() found, served at once with `used` bytes written. */
static void take_and_complete(Engine *e, uint16_t head, uint64_t now, uint32_t used)
{
    e->last_avail++;
    sb_log_taken(e, head);
    sb_complete(e, sb_track(e, head, now), used);
}

static int link_up(const Engine *e) { return e->link == NULL || *e->link; }

static int transmit(Engine *e, uint64_t now)
{
    uint16_t head;
    uint64_t len;
    int k = peek(e, &head);
    if (k <= 0)
        return k;
    len = sb_iov_total(e->rd, e->nrd);
    if (e->nwr || len < NET_HDR) /* Python counts and logs it as a bad frame */
        return -1;
    if (!link_up(e)) {
        e->net_drops++;
    } else {
        ssize_t r;
        do
            r = writev(e->fd, e->rd, e->nrd);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            e->net_drops++;
            e->net_errors++;
        } else {
            e->net_packets++;
            e->net_bytes += len - NET_HDR;
        }
    }
    take_and_complete(e, head, now, 0);
    return 1;
}

/* One frame from the TAP into iov: its length, or -1 when there is none (the loop sleeps
 * until the TAP is readable: rx_idle) or the TAP failed or is closed (a socket standing in
 * for one: end of file). That is counted, and the loop waits as on a spent budget (until a
 * kick, or a backoff that doubles up to a second: rx_failed) instead of polling the TAP,
 * which would spin on its error. */
static ssize_t read_frame(Engine *e, const struct iovec *iov, int n)
{
    ssize_t r;
    do
        r = readv(e->fd, iov, n);
    while (r < 0 && errno == EINTR);
    if (r > 0)
        return r;
    e->rx_idle = r < 0 && errno == EAGAIN;
    e->rx_failed = !e->rx_idle;
    if (e->rx_failed)
        e->net_errors++;
    return -1;
}

static int receive(Engine *e, uint64_t now)
{
    struct iovec *iov = e->tmp;
    uint16_t head;
    uint8_t one[2] = {1, 0};
    ssize_t r;
    int k, n;
    e->rx_idle = 0;
    if (!link_up(e)) { /* read and drop, buffers or not */
        struct iovec all = {e->rx_scratch, NET_MAX_PACKET};
        if (read_frame(e, &all, 1) < 0)
            return 0;
        e->net_drops++;
        e->clock = now_ns();
        return 1;
    }
    k = peek(e, &head);
    if (k <= 0)
        return k;
    if (e->nrd || e->wr_bytes < NET_HDR) /* Python counts and logs it as malformed */
        return -1;
    n = e->nwr;
    memcpy(iov, e->wr, (size_t)n * sizeof *iov);
    if (n >= NET_IOV_MAX)
        return -1;
    iov[n].iov_base = e->rx_scratch; /* so that a longer frame is seen (then dropped) */
    iov[n++].iov_len = NET_MAX_PACKET;
    r = read_frame(e, iov, n);
    if (r < 0)
        return 0;
    e->clock = now_ns();
    if ((uint64_t)r < NET_HDR || (uint64_t)r > e->wr_bytes) { /* consumed, not delivered */
        e->net_drops++;
        return 1;
    }
    sb_scatter(e->wr, e->nwr, NET_NUM_BUFFERS, one, sizeof one);
    if (!e->guest_csum) { /* DATA_VALID / NEEDS_CSUM only when the driver asked for them */
        uint8_t zero = 0;
        sb_scatter(e->wr, e->nwr, 0, &zero, 1);
    }
    e->net_packets++;
    e->net_bytes += (uint64_t)r - NET_HDR;
    take_and_complete(e, head, now, (uint32_t)r);
    return 1;
}

/* Serve the queue's next chain or frame: 1 done (at e->clock; a frame may have been dropped
 * without a chain taken), 0 nothing to do now (the ring is empty, or for receive the TAP
 * has no frame: rx_idle), -1 the next chain is Python's. */
int sb_net_serve(Engine *e, uint64_t now)
{
    return e->dev_kind == DEV_NET_TX ? transmit(e, now) : receive(e, now);
}
