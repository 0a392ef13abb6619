"""Read an offline W&B run file (``run-*.wandb``): wandb 0.31's Python package has no reader.

The file is a 7-byte header (``:W&B``, magic, version) followed by a LevelDB-style log:
32 KiB blocks of records, each with a 7-byte header (crc32, little-endian length, type:
1 full, 2 first, 3 middle, 4 last), whose payloads are ``wandb_internal_pb2.Record``s.

W&B's service process writes the file on its own schedule: ``run.finish()`` can return before
the last records (the final history row, the ``exit`` record) are on disk, so
``read_finished_run`` waits for the ``exit`` record first.
"""

import struct
import time
from pathlib import Path

BLOCK = 32 * 1024


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending, payloads = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_finished_run(path: Path, patience: float = 120.0) -> list:
    """The records of a finished run, once its ``exit`` record is on disk (waiting, not timing)."""
    deadline = time.monotonic() + patience
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
