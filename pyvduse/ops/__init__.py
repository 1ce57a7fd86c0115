"""Operating a running device: management socket, live resize, statistics, metrics, systemd.

- ``protocol``: the management socket's JSON-lines protocol and error codes.
- ``target``: what is operated (a ``DeviceServer`` and the daemon's state), transport-neutral.
- ``inspect``: ``status`` and ``stats`` snapshots, read without locks.
- ``resize``: growing or shrinking a block device and telling the driver (config space).
- ``server``: the socket, on its own thread; ``client``: one request, one reply.
- ``metrics``: Prometheus text format through ``prometheus_client``, imported lazily.
- ``sdnotify``: READY=1 / STOPPING=1 for systemd ``Type=notify`` services.
- ``drain``: wait for requests in flight before detaching.
- ``service``: the above put together for a daemon (``pyvduse blk``).
"""
