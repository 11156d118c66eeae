"""Dynamic batching, as TF Serving and Triton do it: images from requests that arrive within a
few milliseconds of each other go through the model as one call.

One asyncio task gathers queued images and runs the model in a worker thread, so that the
event loop keeps accepting and decoding requests meanwhile. A batch waits, up to `wait` seconds
after its oldest image queued and until it is full, for the requests still being read
(uploaded, decoded) when it could run, and for as many images as the previous batch held:
under steady load from N clients, the N requests answered together come back together, and
wait for each other instead of going through the model in halves (16 clients, TFLite, 32 x 32
PNG: batches of 16 against about 8 without this rule, 1,180 against 1,120 requests/s). A
lone request runs at once instead of waiting for company that is not coming; when the load
falls, one batch waits out `wait`, and the next expects as many as that one had. While the
model is busy, new requests queue up and go together in the next call. A model call takes
images of one shape, so a batch of mixed sizes makes one call per shape.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Run `predict` (N x H x W x 3 uint8 -> N x C probabilities) on batches of queued images.

    Args:
        predict: the model call; it runs in one worker thread, one call at a time.
        max_batch: the most images in one model call; 1 turns batching off.
        wait: seconds the oldest queued image may wait for requests being read to join.
        on_batch: called with the size of every model call (for metrics).
        on_queued: called with the number of images queued, whenever it changes (metrics).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        wait: float,
        on_batch: Callable[[int], None] = lambda size: None,
        on_queued: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.wait = wait
        self._on_batch = on_batch
        self._on_queued = on_queued
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = asyncio.Event()  # the queue is not empty
        self._changed = asyncio.Event()  # a waiting batch may go now (`_ready`)
        self._arriving = 0  # requests being read, whose images will soon queue
        self._last_size = 1  # images in the previous batch: the size of the load, lately
        # one thread: the model uses every core for one call, and not all formats are
        # thread-safe (a TFLite interpreter is not)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop gathering; images still queued get an error (the server has drained its
        requests before it calls this, so normally there are none)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around the reading of a request whose images will come to `predict`: a batch ready
        to run waits for such requests (up to `wait`)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake_if_ready()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities for `images` (each H x W x 3 uint8, of any sizes), in their order."""
        loop = asyncio.get_running_loop()
        items = [_Item(image, loop.create_future()) for image in images]
        self._queue.extend(items)
        self._on_queued(len(self._queue))
        self._queued.set()
        self._wake_if_ready()
        return np.stack(await asyncio.gather(*(item.future for item in items)))

    def _ready(self) -> bool:
        """The queued images may go now: a full batch, or no request is being read and as
        many images queued as the previous batch held."""
        queued = len(self._queue)
        return queued >= self.max_batch or (not self._arriving and queued >= self._last_size)

    def _wake_if_ready(self) -> None:
        # only then: each wake-up of a waiting batch costs the event loop about 15 us (a new
        # `wait_for`: a task and a timer), and under load every request used to cause one
        if self._ready():
            self._changed.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._queued.wait()
            # counted from the oldest image's arrival: images that queued while the model was
            # busy have waited already
            deadline = self._queue[0].arrived + self.wait
            while not self._ready():
                delay = deadline - time.monotonic()
                if delay <= 0:
                    break
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._last_size = len(batch)
            self._on_queued(len(self._queue))
            if not self._queue:
                self._queued.clear()
            for group in _by_shape(batch):
                images = np.stack([item.image for item in group])
                self._on_batch(len(group))
                try:
                    probabilities = await loop.run_in_executor(
                        self._executor, self._predict, images
                    )
                except Exception as exc:  # the requests waiting for it report the fault
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, row in zip(group, probabilities):
                    if not item.future.done():  # its request may have been cancelled
                        item.future.set_result(row)


def _by_shape(items: list[_Item]) -> list[list[_Item]]:
    groups: dict[tuple[int, ...], list[_Item]] = {}
    for item in items:
        groups.setdefault(item.image.shape, []).append(item)
    return list(groups.values())
