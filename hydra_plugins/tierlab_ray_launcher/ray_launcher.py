"""A hydra Launcher that runs every job of a sweep as a Ray remote task, on a local or a remote Ray cluster.

Why tierlab's own: hydra-ray-launcher 1.2.2 (the newest) pins cloudpickle<3, and joblib>=1.6 (the default
sweep launcher's backend) requires cloudpickle>=3, so the two cannot be installed together. This plugin needs
only `ray` (the `distributed` extra). Its config keeps hydra-ray-launcher's shape (`ray.init` -> ray.init(**),
`ray.remote` -> ray.remote(**)), so the two are interchangeable by `_target_`.
"""

# no `from __future__ import annotations`: hydra's plugin scan executes this module outside sys.modules, where
# dataclasses cannot resolve string annotations
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayConf:
    """Keyword arguments of `ray.init()` (`address`: null starts a local Ray, "auto" or "ray://HOST:10001" joins
    a cluster) and of `ray.remote()` for the task that runs one job (`num_cpus`, `max_calls`, `resources`...)."""

    init: dict[str, Any] = field(default_factory=lambda: {"address": None})
    remote: dict[str, Any] = field(default_factory=dict)


@dataclass
class TierlabRayLauncherConf:
    """The schema of conf/hydra/launcher/tierlab_ray.yaml: a misspelt top-level key fails at composition."""

    _target_: str = "hydra_plugins.tierlab_ray_launcher.ray_launcher.TierlabRayLauncher"
    ray: RayConf = field(default_factory=RayConf)


ConfigStore.instance().store(group="hydra/launcher", name="tierlab_ray_schema", node=TierlabRayLauncherConf,
                             provider="tierlab")


def _run_job(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction,
             singleton_state: dict[Any, Any]) -> JobReturn:
    """Run one job inside a Ray worker, as hydra's joblib launcher does inside a loky worker."""
    import ray

    # a Ray worker starts in Ray's session dir: run where the driver ran (when this node has that path, i.e.
    # the same machine or a shared file system), so relative paths (hydra.sweep.dir=multirun/x) mean the same
    cwd = sweep_config.hydra.runtime.cwd
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = ray.get_runtime_context().get_task_id()
    HydraConfig.instance().set_config(sweep_config)
    try:
        return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except SystemExit as exc:
        # tierlab's commands exit 2 on a config error (after printing it, which Ray forwards): as an exception the
        # sweep fails naming the job, where an exit would look to Ray like a crashed worker, to be retried
        raise RuntimeError(f"job {sweep_config.hydra.job.num} exited with status {exc.code}") from None


class TierlabRayLauncher(Launcher):
    """Submit every job of the sweep as one `ray.remote` task at once; Ray schedules them on the cluster's CPUs
    (`ray.remote.num_cpus` each) and the launcher waits for all, showing progress, returning them in order."""

    def __init__(self, ray: DictConfig) -> None:
        self.ray_cfg = ray
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep what `launch` needs (hydra calls this once per sweep)."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        """Run the jobs `initial_job_idx, ...` (one list of overrides each) as Ray tasks; their JobReturns."""
        import ray
        from tqdm import tqdm

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = _kwargs(self.ray_cfg.init, "hydra.launcher.ray.init")
        remote = _kwargs(self.ray_cfg.remote, "hydra.launcher.ray.remote")
        try:  # before connecting, so that a misspelt option fails at once
            task = ray.remote(**remote)(_run_job) if remote else ray.remote(_run_job)
        except (TypeError, ValueError) as exc:  # Ray names the option it refuses
            raise ValueError(f"hydra.launcher.ray.remote: {exc}") from None
        if not ray.is_initialized():
            log.info(f"Ray: init({init})")
            try:
                ray.init(**init)
            except (TypeError, ValueError, RuntimeError, ConnectionError) as exc:  # bad keyword, no cluster there
                raise RuntimeError(f"hydra.launcher.ray.init {init}: {exc}") from exc
        log.info(f"Ray launcher: {len(job_overrides)} jobs on {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"sweep output dir: {sweep_dir}")
        # shipped once to the object store, not once per task
        shared = [ray.put(x) for x in (self.hydra_context, self.task_function, Singleton.get_state())]
        t0 = time.perf_counter()
        refs = []
        # composed here, where the config files are, and sent at once: workers need no conf/ of their own
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.num = idx
            refs.append(task.remote(shared[0], sweep_config, shared[1], shared[2]))
        pending = list(refs)
        with tqdm(total=len(refs), desc="ray jobs", unit="job") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        returns = list(ray.get(refs))
        failed = sum(r.status == JobStatus.FAILED for r in returns)
        log.info(f"Ray launcher: {len(returns)} jobs done in {time.perf_counter() - t0:.1f} s wall, {failed} failed")
        return returns


def _kwargs(cfg: Any, where: str) -> dict[str, Any]:
    """A config mapping as plain keyword arguments (resolved), or a clear error naming the config key."""
    if cfg is None:
        return {}
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if not isinstance(plain, dict):
        raise ValueError(f"{where}: expected a mapping of keyword arguments, got {plain!r}")
    return plain
