"""One hydra entry point shape for every tierlab command (simulate, serve, replay)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ConfigError, TraceFormatError

# absolute, so the console scripts find it wherever they are launched from
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_command(config_name: str, body: Callable[[dict[str, Any], Path], str | None], prog: str = "tierlab",
                  errors: tuple[type[BaseException], ...] = ()) -> None:
    """Compose `conf/<config_name>` under hydra (overrides, --multirun, output dirs) and call
    `body(config as plain containers, hydra's output dir)`; print the line it returns.

    Config and trace errors (and `errors`) end the process with status 2 and one line naming the field.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> None:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(plain, dict)
        try:
            line = body(plain, out_dir)
        except (ConfigError, TraceFormatError, *errors) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        if line:
            print(line)

    main()
