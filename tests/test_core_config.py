"""`core.config`: a composed config's policy bundle and specs, built purely, errors naming the field."""

from __future__ import annotations

import pytest

import experiments.setup as setup
from core.config import build_policy, build_specs, import_target, models_for
from core.errors import ConfigError
from core.policies.base import PolicyBundle
from tests.conftest import config


def test_the_real_configs_build_and_setup_reexports_core() -> None:
    cfg = config("cluster=small", "policy=sllm")
    specs = build_specs(cfg)
    assert isinstance(specs.policy, PolicyBundle) and specs.policy.name == "sllm"
    # sim.initial_state names a state and sim.steady_state a mode, not numbers: experiments.setup and the world read
    # them
    numbers = {k: float(v) for k, v in cfg["sim"].items() if k not in ("initial_state", "steady_state")}
    assert [n.name for n in specs.cluster.nodes] and specs.sim == numbers
    # notebooks and tests keep importing these from experiments.setup: the very same functions
    assert setup.build_policy is build_policy and setup.load_models is models_for and setup._import is import_target
    built = setup.build({**cfg, "workload": {**cfg["workload"], "max_requests": 5}})
    assert built.cluster == specs.cluster and len(built.workload) == 5
    assert set(built.workload.model.tolist()) <= {m.name for m in built.models}


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ({"_target_": "core.policies.nope.Missing"},
         r"policy\._target_: cannot import 'core\.policies\.nope\.Missing'"),
        ({"_target_": "core.policies.base.PolicyBundle", "placement": {"_target_": "nowhere"}},
         r"policy\.placement\._target_: cannot import 'nowhere'"),
        ({"_target_": "core.policies.base.PolicyBundle", "bogus": 1}, r"policy: .*bogus"),
        ({"_target_": "collections.OrderedDict"}, r"policy\._target_: must build a core\.policies\.base\.PolicyBundle"),
    ],
)
def test_policy_errors_name_the_field(policy: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_policy(policy)


def test_sim_knobs_must_be_positive() -> None:
    cfg = config("cluster=small")
    with pytest.raises(ConfigError, match=r"sim\.\w+ must be > 0"):
        build_specs({**cfg, "sim": {next(iter(cfg["sim"])): 0}})
