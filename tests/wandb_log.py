"""Reads the history that W&B wrote into an offline run's ``.wandb`` file (for tests).

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
records, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf
``Record`` from ``wandb.proto.wandb_internal_pb2``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, records, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        rec = pb.Record()
        rec.ParseFromString(pending)
        records.append(rec)
    return records


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row of the offline run(s) under ``run_dir/wandb``, in order."""
    rows = []
    for log in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in read_records(log):
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
