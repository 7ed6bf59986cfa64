"""The side-stream prefetcher the GPU-decoding training loaders use: the next batches decoded on the GPU while
the current one trains."""

from __future__ import annotations

import contextlib
import queue
import threading

import torch


class CUDAPrefetcher:
    """Iterate a loader with the next batches prepared on a side CUDA stream, overlapping training.

    A background thread takes each host batch (JPEG bytes) from ``loader`` and runs ``prepare`` on it
    (copy, nvJPEG decode, crops) on its own stream, ``depth`` batches ahead; the consumer waits only on
    that batch's event. Without this, decoding and training take turns and the GPU idles while it
    decodes. ``sampler`` is the loader's, so Lightning's ``set_epoch`` reaches it.
    """

    def __init__(self, loader, prepare, device: torch.device, depth: int = 2) -> None:
        self.loader = loader
        self.prepare = prepare
        self.device = device
        self.depth = depth

    @property
    def sampler(self):
        return self.loader.sampler

    def state_dict(self) -> dict:  # the loader's position, for Lightning's checkpoints
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"  # (on the CPU only the thread and the queue remain, for tests)
        stream = torch.cuda.Stream(self.device) if cuda else None
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            if cuda:
                torch.cuda.set_device(self.device)
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for batch in self.loader:
                        out = self.prepare(batch)
                        event = torch.cuda.Event() if cuda else None
                        if event is not None:
                            event.record(stream)
                        if not put((out, event)):
                            return
            except BaseException as err:  # re-raised in the consumer
                put(err)
            put(done)

        thread = threading.Thread(target=produce, name="cuda-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                out, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for value in out.values():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(current)  # the allocator must not reuse it before training is done
                yield out
        finally:
            stop.set()
            thread.join(timeout=10)
