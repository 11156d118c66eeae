"""The dynamic batching queue of `imageclf serve`, on its own: which requests share a model call."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from imageclf.batching import Batcher


def _images(count: int, value: int) -> list[np.ndarray]:
    return [np.full((4, 4, 3), value + i, np.uint8) for i in range(count)]


def _model(images: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a classifier: each image's first pixel, twice."""
    first = images[:, 0, 0, 0].astype(np.float32)
    return np.stack([first, 2 * first], axis=1)


def test_batches_follow_the_load_and_a_lone_request_does_not_wait() -> None:
    sizes: list[int] = []
    wait = 1.0

    async def scenario() -> list[float]:
        batcher = Batcher(_model, max_batch=64, wait=wait, on_batch=sizes.append)
        batcher.start()
        try:
            # a lone request runs at once instead of waiting for company
            start = time.monotonic()
            await batcher.predict(_images(1, 0))
            lone = time.monotonic() - start
            # four clients at once share one call
            answers = await asyncio.gather(*(batcher.predict(_images(1, 10 * i)) for i in range(4)))
            assert [row[0][0] for row in answers] == [0, 10, 20, 30]  # each gets its own row
            # the same four come back a little apart: after a batch of 4, the first waits
            # for the other three instead of going through the model alone
            first = asyncio.ensure_future(batcher.predict(_images(1, 50)))
            await asyncio.sleep(0.05)
            rest = await batcher.predict(_images(3, 60))
            assert (await first)[0].tolist() == [50.0, 100.0]
            assert rest[:, 0].tolist() == [60.0, 61.0, 62.0]
            # the load falls to one client: its first request waits out `wait` once, then
            # requests run at once again
            await batcher.predict(_images(1, 70))
            start = time.monotonic()
            await batcher.predict(_images(1, 80))
            return [lone, time.monotonic() - start]
        finally:
            await batcher.stop()

    lone, after_fall = asyncio.run(scenario())
    assert sizes == [1, 4, 4, 1, 1]
    assert lone < wait / 2 and after_fall < wait / 2
