"""Files the driver holds, shipped to workers on nodes that share no disk with it: the bytes go
into Ray's object store once, and a worker reads them by name (`Shipment.read`), wherever it
runs. A worker module uses a Shipment it is handed without importing Ray itself."""

from __future__ import annotations

from pathlib import Path


class Shipment:
    """{file name: an object reference to its bytes}; small to pickle, read on any node."""

    def __init__(self, refs: dict):
        self.refs = refs

    def read(self, name: str) -> bytes:
        import ray

        if name not in self.refs:
            raise FileNotFoundError(f"{name}: not in this shipment")
        return bytes(ray.get(self.refs[name]))


def ship(folder: str | Path, names) -> Shipment:
    """The named files of a local folder, put into the connected Ray's object store."""
    import ray

    return Shipment({n: ray.put((Path(folder) / n).read_bytes()) for n in names})
