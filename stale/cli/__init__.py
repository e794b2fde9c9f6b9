"""Console entry points: thin @hydra.main apps over library functions.

Every app is declared with `stale_app`: `hydra.main(version_base="1.3", ...)` that also, on a misspelt command-line
key, prints every key that node accepts and the nearest one (Hydra only suggests appending it with `+`), and ends a
bad input (a ValueError, also inside Hydra's instantiate) with one line `stale-X: error: <message>` and exit code 2,
the traceback one environment variable away (HYDRA_FULL_ERROR=1). quiet_console keeps the console quiet: each log
line printed once (PrintedOnce), and only the library warnings in LIBRARY_WARNINGS and the ADVERTS filtered.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_PATH = "pkg://stale.conf"  # conf/ is packaged as stale.conf (see pyproject.toml)
CONFIG_MODULE = "stale.conf"


# Warnings a library raises about its own code, or about what stale does on purpose, whatever the user's settings:
# (category, message regex, module the warning is attributed to). Nothing else is filtered.
LIBRARY_WARNINGS = (
    # Lightning 2.6 still builds torch's deprecated LeafSpec when it flattens a batch (torch >= 2.10 warns)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # no data.val_shards: the data module's val_dataloader is [] (no validation), which Lightning questions
    (UserWarning, r"Total length of `list` across ranks is zero", r"lightning\.pytorch\.utilities\.data"),
)
# Log lines that advertise a product, not the run: (logger, message prefix).
ADVERTS = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),  # Lightning: "install litlogger"
)


class PrintedOnce(logging.Filter):
    """For the root logger's console handler: pass a record only if no console handler of a logger between its
    own and the root printed it already. Lightning gives the `lightning` logger a console handler of its own when it
    is imported, which stale-train does after Hydra set up logging, so each of its lines printed twice; now they
    print once (Lightning's copy, on stderr) and still reach the file handler (the run's train.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger.parent is not None:  # up to the root, which holds this handler
            if any(_prints(h, record) for h in logger.handlers):
                return False
            logger = logger.parent if logger.propagate else None
        return True


def _prints(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Whether `handler` writes `record` to the console (a file handler is no console)."""
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
        and record.levelno >= handler.level
    )


class _NoAdvert(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_console() -> None:
    """Filter LIBRARY_WARNINGS and ADVERTS for this process (its loader workers inherit it), and route Lightning's
    lines to the root logger's handlers (the run's log file). Idempotent."""
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric"):
            # imported while the root logger had no handler (a notebook, a test process), Lightning gave these
            # loggers a console of their own and stopped them propagating; imported later it leaves them to the
            # root, as it is done here
            logger = logging.getLogger(name)
            if not logger.propagate:
                for handler in [
                    h
                    for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                ]:
                    logger.removeHandler(handler)
                logger.propagate = True
    for category, message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in ADVERTS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvert) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_NoAdvert(prefix))


def explain_override_error(config_name: str, overrides: list[str], config_path: str | None = CONFIG_PATH) -> str:
    """Compose the app's config with `overrides` again; if a key does not exist, say which keys its node has."""
    from hydra import compose, initialize, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf.errors import OmegaConfBaseException

    from stale.utils.schema import PRIVATE, unknown_key_message

    overrides = [o for o in overrides if not o.startswith("-")]  # --multirun, --cfg job, ...
    GlobalHydra.instance().clear()
    init = (
        initialize_config_module(CONFIG_MODULE, version_base="1.3")
        if config_path
        else initialize(config_path=None, version_base="1.3")
    )
    try:
        with init:
            compose(config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - we only look for the OmegaConf error in the chain
        cause: BaseException | None = e
        while cause is not None:
            parent = getattr(cause, "parent_node", None)
            full_key = getattr(cause, "full_key", None)
            if isinstance(cause, OmegaConfBaseException) and isinstance(parent, DictConfig) and full_key:
                path, _, key = str(full_key).rpartition(".")
                return f"stale: {unknown_key_message(path, key, {str(k) for k in parent.keys()} - PRIVATE)}"
            cause = cause.__cause__ or cause.__context__
    finally:
        GlobalHydra.instance().clear()
    return ""


def stale_app(
    config_name: str, config_path: str | None = CONFIG_PATH, flat_keys: DictConfig | None = None
) -> Callable[[Callable], Callable[[], object]]:
    """hydra.main for stale's apps. flat_keys: the packaged config of a flat app, whose root keys are the only
    keys the app accepts (a `+typo=1` would otherwise be ignored)."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        @functools.wraps(task)
        def checked(cfg: DictConfig):
            quiet_console()
            try:
                if flat_keys is not None:
                    from stale.utils.schema import check_flat_keys

                    check_flat_keys(cfg, flat_keys)
                return task(cfg)
            except Exception as e:  # noqa: BLE001 - only user errors are reported here; the rest re-raise
                message = user_error(e)
                if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
                raise SystemExit(2) from None

        app = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(checked)

        @functools.wraps(task)
        def entry() -> object:
            try:
                return app()
            except SystemExit as e:
                if e.code not in (0, None):
                    hint = explain_override_error(config_name, sys.argv[1:], config_path)
                    if hint:
                        print(hint, file=sys.stderr)
                raise

        return entry

    return decorate


def user_error(e: BaseException) -> str | None:
    """The one-line message of a bad input: a ValueError (or FileNotFoundError), also when Hydra's instantiate
    wrapped it while building a node; None for anything else (a bug, which keeps its traceback)."""
    from hydra.errors import InstantiationException

    if isinstance(e, InstantiationException) and isinstance(e.__cause__, (ValueError, FileNotFoundError)):
        e = e.__cause__
    if isinstance(e, (ValueError, FileNotFoundError)):
        return " ".join(str(e).split()) or type(e).__name__
    return None


def packaged_config(name: str) -> DictConfig:
    """conf/<name>.yaml as shipped in the package (the schema of a flat app)."""
    from importlib.resources import files

    return OmegaConf.create((files(CONFIG_MODULE) / f"{name}.yaml").read_text())
