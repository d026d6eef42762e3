"""OutputTail keeps exactly the last bytes of a stream, in bounded memory."""

from __future__ import annotations

import random

from dist_exec.output_tail import OutputTail
from dist_exec.worker.task_runner import OUTPUT_TAIL_BYTES, _Buffer


def test_the_tail_is_the_last_bytes_whatever_the_chunking() -> None:
    rng = random.Random(7)
    for limit in (1, 5, 64, 1000):
        tail, stream = OutputTail(limit), bytearray()
        for _ in range(300):
            data = rng.randbytes(rng.choice((0, 1, 3, limit - 1, limit, limit + 1, 2 * limit)))
            tail.add(data)
            stream += data
            assert tail.value() == bytes(stream[-limit:])
            assert tail._size < 2 * limit  # never much more than the limit


def test_a_worker_buffer_replays_head_and_tail_from_any_offset() -> None:
    buf = _Buffer(limit=10)
    data = bytes(range(256)) * ((OUTPUT_TAIL_BYTES // 256) + 8)
    buf.add(data[:4])
    buf.add(data[4:])
    head, tail_start = data[:10], len(data) - OUTPUT_TAIL_BYTES
    assert buf.kept(0) == [(0, head), (tail_start, data[tail_start:])]
    assert buf.kept(5) == [(5, head[5:]), (tail_start, data[tail_start:])]
    assert buf.kept(tail_start + 3) == [(tail_start + 3, data[tail_start + 3 :])]
    assert buf.kept(len(data)) == []
    assert buf.total == len(data)
