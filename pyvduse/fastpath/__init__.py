"""The optional native data path: a C loop serving virtio-blk split rings (``_splitblk``).

The pure-Python engine (``pyvduse.ring`` + ``pyvduse.device.blk``) is the reference and
stays the path for everything the native loop does not take; see ``engine.py``.
"""
