"""The ground floor every package stands on: nothing here imports ``backbones``, ``datamodules`` or ``tasks``.

* :mod:`zoo_common.command` -- a module's ``main`` run as a shell command, user errors as one line;
* :mod:`zoo_common.cache` -- the folder of what is computed once and reused;
* :mod:`zoo_common.distributed` -- whether DDP is running, and gathering Python objects across its ranks.
"""
