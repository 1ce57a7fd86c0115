"""pyvduse: userspace virtio devices for Linux, served through VDUSE."""

__version__ = "0.1.0"
