"""stale-bench: `stale-bench [sections=train,sampler] [out=bench.json] [hydra overrides]`.

Runs the selected benchmark sections (stale.bench.SECTIONS), prints a table per section and writes one
JSON document to `out`. Every section's settings are keys of conf/bench.yaml, e.g.
`stale-bench sections=train train.steps=50 out=overhead.json`.
"""

import sys

from omegaconf import DictConfig

from stale.cli import packaged_config, stale_app


def listify_sections(argv: list[str]) -> list[str]:
    """`sections=train,data` -> `sections=[train,data]`.

    Hydra reads an unquoted a,b as a sweep and refuses it outside --multirun; a comma list is the
    natural way to name sections, so the command line is rewritten before Hydra parses it.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "sections" and "," in value and not value.startswith(("[", "'", '"')):
            arg = f"{key}=[{value}]"
        out.append(arg)
    return out


@stale_app("bench", flat_keys=packaged_config("bench"))
def _main(cfg: DictConfig) -> None:
    from stale.bench import run_bench  # imported late so that --help is fast

    run_bench(cfg, command=" ".join(["stale-bench", *sys.argv[1:]]))  # a bad section name: one line, exit 2


def main() -> None:
    sys.argv[1:] = listify_sections(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
