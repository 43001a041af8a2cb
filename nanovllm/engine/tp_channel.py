"""Rank 0's call channel to the tensor-parallel workers.

A message is pickled once into a shared-memory buffer that every worker reads; a pipe per worker
carries the small control messages: "a chunk of n bytes is ready" one way, "read it" back. Rank 0
writes a chunk only after every worker has acknowledged the previous one, so a slow reader never
sees its buffer overwritten, and a message larger than the buffer goes in several chunks. The wait
for acknowledgements happens before the next write, not after this one, so rank 0 runs its own
forward pass while the workers copy the message.

Nothing here outlives the engine: the segment has a unique name (pid + random) and rank 0 unlinks it
as soon as every worker has attached, so even a crash cannot leave it in /dev/shm. The pipes double
as liveness signals: a process that dies closes its end, and its peer reads EOF instead of waiting.
"""
import os
import pickle
import struct
import uuid
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

DEFAULT_CAPACITY = 4 * 2**20
CHUNK_HEADER = struct.Struct("<Q?")  # bytes in this chunk, whether it is the message's last
ACK = b""


class WorkerGone(Exception):
    """A worker's pipe closed: the process has exited."""

    def __init__(self, index: int):
        super().__init__(f"worker {index} closed its channel")
        self.index = index


class ChannelEndpoint:
    """A worker's end of the channel; pickled into the worker process when it is spawned."""

    def __init__(self, shm_name: str, conn: Connection):
        self.shm_name = shm_name
        self.conn = conn
        self.shm: SharedMemory | None = None

    def attach(self) -> None:
        """Map the buffer and tell rank 0 (which then unlinks its name)."""
        self.shm = SharedMemory(name=self.shm_name)
        self.conn.send_bytes(ACK)

    def receive(self):
        """The next message. Raises EOFError once rank 0 is gone."""
        parts = []
        while True:
            size, last = CHUNK_HEADER.unpack(self.conn.recv_bytes())
            parts.append(bytes(self.shm.buf[:size]))
            self.conn.send_bytes(ACK)  # copied: rank 0 may overwrite the buffer now
            if last:
                return pickle.loads(b"".join(parts))

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self.conn.close()


class CallChannel:
    """Rank 0's end: broadcasts pickled messages to num_workers workers."""

    def __init__(self, num_workers: int, capacity: int | None = None):
        self.capacity = capacity = capacity or DEFAULT_CAPACITY
        self.shm = SharedMemory(create=True, size=capacity, name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:16]}")
        self.linked = True
        self.attached = False  # every worker has mapped the buffer
        pipes = [Pipe() for _ in range(num_workers)]
        self.conns = [mine for mine, _ in pipes]
        self.endpoints = [ChannelEndpoint(self.shm.name, theirs) for _, theirs in pipes]
        # Rank 0 waits for these before its next write: one per worker for the last chunk sent.
        self.awaiting_acks = False

    def release_worker_ends(self) -> None:
        """Close rank 0's copies of the workers' pipe ends (after spawning), so that a worker that
        dies leaves its pipe with no writer and rank 0 reads EOF."""
        for endpoint in self.endpoints:
            endpoint.conn.close()

    def wait_for_attach(self) -> None:
        """Wait until every worker has mapped the buffer, then unlink its name."""
        self.awaiting_acks = True
        self.wait_for_acks()
        self.attached = True
        self.shm.unlink()
        self.linked = False

    def wait_for_acks(self) -> None:
        if not self.awaiting_acks:
            return
        for index, conn in enumerate(self.conns):
            try:
                conn.recv_bytes()
            except (EOFError, OSError):
                raise WorkerGone(index) from None
        self.awaiting_acks = False

    def send(self, message) -> None:
        data = memoryview(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        for start in range(0, len(data), self.capacity):
            chunk = data[start:start + self.capacity]
            self.wait_for_acks()
            self.shm.buf[:len(chunk)] = chunk
            header = CHUNK_HEADER.pack(len(chunk), start + len(chunk) == len(data))
            for index, conn in enumerate(self.conns):
                try:
                    conn.send_bytes(header)
                except OSError:  # BrokenPipeError: the worker has exited
                    raise WorkerGone(index) from None
            self.awaiting_acks = True

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.shm.close()
        if self.linked:
            self.shm.unlink()
            self.linked = False
