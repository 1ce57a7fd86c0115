# Types of the engine built with io_uring and libnbd: the same interface as _splitblk.
from pyvduse.fastpath._splitblk import *  # noqa: F403
from pyvduse.fastpath._splitblk import Engine as Engine
