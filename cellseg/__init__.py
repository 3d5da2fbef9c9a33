"""cellseg: the torch-free runtime shared by serving, batch jobs, evaluation and the client."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]


def __getattr__(name: str):
    # The client needs httpx; import it only when asked so evaluation/batch jobs stay light.
    if name == "Client":
        from cellseg.client import Client

        return Client
    raise AttributeError(name)
