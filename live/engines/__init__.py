"""Engines of the live stack: the CPU engine (torch Llama + OpenAI-compatible server), Tokasaurus (GPU), and the
engine-process contract.

Importing this package stays cheap (no torch): `base` holds the contracts, `ProcessEngine` and
`CpuEngineProcess`; `tokasaurus` runs Tokasaurus's `toka`; `factory.make_engine` picks one by kind;
`live.engines.llama` (the model) and `live.engines.cpu_server` (the server) import torch when used.
"""

from live.engines.base import (
    BackgroundSafetensorsLayerSource,
    CpuEngineProcess,
    EngineHandle,
    EngineStartError,
    EventLayerSource,
    LayerSource,
    ProcessEngine,
    SafetensorsLayerSource,
    dead_group_members,
    free_port,
    running_group_members,
    tensor_group,
)
from live.engines.factory import ENGINE_KINDS, make_engine
from live.engines.tokasaurus import TokaProfile, TokasaurusProcess, count_params, toka_profile

__all__ = [
    "ENGINE_KINDS",
    "BackgroundSafetensorsLayerSource",
    "CpuEngineProcess",
    "EngineHandle",
    "EngineStartError",
    "EventLayerSource",
    "LayerSource",
    "ProcessEngine",
    "SafetensorsLayerSource",
    "TokaProfile",
    "TokasaurusProcess",
    "count_params",
    "dead_group_members",
    "free_port",
    "make_engine",
    "running_group_members",
    "tensor_group",
    "toka_profile",
]
