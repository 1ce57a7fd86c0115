"""An in-process model of the driver side of virtio: memory, rings, requests (for tests)."""
