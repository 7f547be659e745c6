"""Imported by the multiprocessing forkserver a ProcessPool starts (a preload module, see
isolation._children._forkserver_preload): the forkserver ignores SIGTERM, so a SIGTERM sent to the whole
process group or to every process of a service (systemd) leaves it to serve the pool while
the parent drains; the processes it forks start with SIGTERM's default action again."""

import os
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
