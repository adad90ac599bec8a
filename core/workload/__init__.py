"""Workloads: the `Workload` trace container, real-trace readers, synthetic generators and model assignment."""

from core.workload.embedded import EMBEDDED, embedded_path
from core.workload.generators import diurnal, gamma, poisson
from core.workload.lengths import FixedLengths, LognormalLengths, TokenSampler, TraceLengths
from core.workload.models import assign_models, popularity, zipf_weights
from core.workload.readers import READERS, read_azure_llm, read_mooncake, read_servegen, read_trace
from core.workload.trace import Workload

__all__ = [
    "EMBEDDED",
    "READERS",
    "FixedLengths",
    "LognormalLengths",
    "TokenSampler",
    "TraceLengths",
    "Workload",
    "assign_models",
    "diurnal",
    "embedded_path",
    "gamma",
    "poisson",
    "popularity",
    "read_azure_llm",
    "read_mooncake",
    "read_servegen",
    "read_trace",
    "zipf_weights",
]
