"""Engines of the live stack: the CPU engine (torch Llama + OpenAI-compatible server) and the engine-process contract.

Importing this package stays cheap (no torch): `base` holds the contracts and `CpuEngineProcess`;
`live.engines.llama` (the model) and `live.engines.cpu_server` (the server) import torch when used.
"""

from live.engines.base import (
    BackgroundSafetensorsLayerSource,
    CpuEngineProcess,
    EngineHandle,
    EngineStartError,
    EventLayerSource,
    LayerSource,
    SafetensorsLayerSource,
    free_port,
    running_group_members,
    tensor_group,
)

__all__ = [
    "BackgroundSafetensorsLayerSource",
    "CpuEngineProcess",
    "EngineHandle",
    "EngineStartError",
    "EventLayerSource",
    "LayerSource",
    "SafetensorsLayerSource",
    "free_port",
    "running_group_members",
    "tensor_group",
]
