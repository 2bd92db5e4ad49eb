"""Bundle file helpers shared by the model scripts (make_test_bundle.py, convert_clip.py, peers.py)."""
import hashlib
import json
from pathlib import Path


def save_safetensors(tensors, path, metadata):
    """Writes F32 tensors in the safetensors format with a sorted header, so the same
    values always give the same bytes (the reference writer orders keys by hash)."""
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().cpu().contiguous().float().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def sha256(path):
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
