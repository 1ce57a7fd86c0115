#!/usr/bin/env bash
# Serve a disk image with pyvduse and use it through Linux's own virtio-blk driver:
# create an image, serve it, put ext4 on it, write and read files, stop the daemon cleanly.
# Run it where the vduse module is loaded (as root), or in the test VM:
#   pyvduse testvm -- bash examples/quickstart.sh
set -euo pipefail
IMG=${1:-/tmp/pyvduse-demo.img}
MNT=$(mktemp -d)
truncate -s 512M "$IMG"
coproc DAEMON { exec python3 -m pyvduse --log-level info blk --name demo0 --file "$IMG"; }
read -r ready <&"${DAEMON[0]}"            # "READY name=demo0 dev=/dev/vdX"
echo "$ready"
dev=${ready##*dev=}
mkfs.ext4 -q -F "$dev"
mount "$dev" "$MNT"
seq 1 100000 > "$MNT/numbers.txt"
cp -r /etc/ssl "$MNT/" 2>/dev/null || true
sync
df -h "$MNT" | tail -1
sha256sum "$MNT/numbers.txt"
umount "$MNT"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" && echo "daemon exited cleanly"
e2fsck -fn "$IMG" >/dev/null && echo "image $IMG: ext4 clean"
