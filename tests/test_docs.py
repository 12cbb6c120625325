"""Every `convert-fp8 ...` and `make ...` line in the fenced `sh` blocks of README.md and docs/*.md runs here.

One test per line. An example fails on a non-zero exit, and on an option (or make target) that no longer exists:
that check is made against the CLI's own options for every example, including those not run. The lines of one
block run in order in one scratch folder; a line whose paths name what an earlier line of its block writes runs
after that line (run again as set-up when only part of the block is selected).

Paths are mapped onto the demo checkpoints: a `--src` folder the block has not written is a copy of the demo
Gemma-4 (BF16), the `--src` of `dequantize` and the `--dst` of `verify` and `validate` a copy of its FP8
conversion; a Hub repo id `org/name` is served by the stand-in Hub (tests/fake_hub.py) in a process of its own;
`make` runs in the checkout with its virtual environment as it is, `DEMO_DIR`, `SRC` and `DST` in the scratch
folder. Hub and make examples start processes and are slow.

The HTML comment on the line before a block: `<!-- doc-test: skip (REASON) -->` (not run, reported as skipped
with REASON) or `<!-- doc-test: slow -->` (run with -m slow).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from converter.cli import main

from .fake_hub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*doc-test:\s*(?:(skip)\s*\((.+)\)|(slow))\s*-->$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUNS = ("convert-fp8", "make")


@dataclass
class Example:
    doc: str  # path relative to the checkout
    line: int
    text: str
    block: tuple[str, int]  # (doc, line of the opening fence)
    index: int  # position in its block
    skip: str | None = None  # the reason, when marked skip
    slow: bool = False
    env: dict = field(default_factory=dict)  # VAR=value words before the command
    argv: list = field(default_factory=list)  # the command and its arguments

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse(rel: str, text: str) -> list[Example]:
    """The examples of the ```sh blocks of document `rel`, with the marks of the comment before each block."""
    lines = text.splitlines()
    examples, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```sh":
            i += 1
            continue
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(prev)
        if prev.startswith("<!--") and "doc-test" in prev and not mark:
            raise AssertionError(f"{rel}:{i}: doc-test comment not understood: {prev}")
        block, i, index, pending = (rel, i + 1), i + 1, 0, ""
        while i < len(lines) and lines[i].strip() != "```":
            text = pending + lines[i]
            i += 1
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            words = shlex.split(text, comments=True)
            env = {}
            while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if not words or words[0] not in RUNS:
                continue
            examples.append(Example(rel, i, text.strip(), block, index, skip=mark and mark.group(2),
                                    slow=bool(mark and mark.group(3)), env=env, argv=words))
            index += 1
    return examples


EXAMPLES = [e for doc in DOCS for e in parse(doc.relative_to(ROOT).as_posix(), doc.read_text())]


def options_of(argv: list[str]) -> tuple[click.Command, dict[str, str | None]]:
    """The click command an example calls and its options (name -> value, None for a flag); fails on an option or
    argument the command does not have."""
    args = argv[1:]
    command = main
    if args and args[0] in main.commands:
        command, args = main.commands[args[0]], args[1:]
    params = {name: p for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}
    got: dict[str, str | None] = {}
    k = 0
    while k < len(args):
        word = args[k]
        name, eq, value = word.partition("=")
        if name in ("-h", "--help"):
            got[name] = None
        elif word.startswith("-"):
            assert name in params, f"`{' '.join(argv[:2] if command is not main else argv[:1])}` has no option {name}"
            if params[name].is_flag or params[name].count:
                got[name] = None
            elif eq:
                got[name] = value
            else:
                assert k + 1 < len(args), f"{name} needs a value"
                got[name], k = args[k + 1], k + 1
        else:
            raise AssertionError(f"unexpected argument {word!r} (not a command of convert-fp8)")
        k += 1
    return command, got


def make_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)}


def make_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(targets, VAR=value settings) of a make example; fails on a target the Makefile does not have."""
    targets, settings = [], {}
    for word in argv[1:]:
        if "=" in word:
            key, _, value = word.partition("=")
            settings[key] = value
        else:
            assert not word.startswith("-"), f"make option {word} in an example"
            assert word in make_targets(), f"the Makefile has no target {word}"
            targets.append(word)
    return targets, settings


def check(example: Example) -> dict[str, str | None]:
    if example.argv[0] == "make":
        return make_args(example.argv)[1]
    return options_of(example.argv)[1]


def is_hub(value: str | None, workdir: Path) -> bool:
    return bool(value and HUB_ID.match(value) and not (workdir / value).exists())


def paths_of(example: Example) -> set[str]:
    """The paths an example names (--src, --dst, SRC=, DST=)."""
    opts = check(example)
    return {v for k, v in opts.items() if k in ("--src", "--dst", "SRC", "DST") and v}


def writes(example: Example) -> str | None:
    opts = check(example)
    if example.argv[0] == "make":
        return opts.get("DST") or (opts["SRC"].rstrip("/") + "-FP8" if opts.get("SRC") else None)
    return opts.get("--dst")


def is_slow(example: Example) -> bool:
    """Marked slow, or starting a process of its own: make, or a Hub source (its endpoint is read at import)."""
    if example.slow or example.argv[0] == "make":
        return True
    argv = example.argv  # read leniently: an option that no longer exists fails the test, not the collection
    src = next((argv[k + 1] for k in range(len(argv) - 1) if argv[k] == "--src"), None)
    return bool(src and HUB_ID.match(src))


class Demo:
    """The demo checkpoints the examples' paths are mapped onto."""

    def __init__(self, bf16: Path, fp8: Path):
        self.bf16, self.fp8 = bf16, fp8

    def place(self, workdir: Path, name: str, fp8: bool) -> Path:
        target = workdir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.fp8 if fp8 else self.bf16, target,
                            ignore=shutil.ignore_patterns("convert-fp8-*.json"))
        return target


def run(example: Example, workdir: Path, demo: Demo) -> tuple[int, str]:
    """Run one example in `workdir`; (exit code, output)."""
    if example.argv[0] == "make":
        return run_make(example, workdir, demo)
    command, opts = options_of(example.argv)
    sub = command.name if command is not main else "convert"
    src, dst = opts.get("--src"), opts.get("--dst")
    if is_hub(src, workdir):
        return run_hub(example, workdir, demo, fp8=sub == "dequantize")
    if src:
        demo.place(workdir, src, fp8=sub == "dequantize")
    if dst and sub in ("verify", "validate"):
        demo.place(workdir, dst, fp8=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(main, example.argv[1:], env={"CONVERT_FP8_NO_PROGRESS": "1", **example.env})
    finally:
        os.chdir(cwd)
    return result.exit_code, result.output


def run_hub(example: Example, workdir: Path, demo: Demo, fp8: bool) -> tuple[int, str]:
    src = options_of(example.argv)[1]["--src"]
    repo = demo.place(workdir / ".hub-repos", src, fp8=fp8)
    with FakeHub(src, repo) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(workdir / ".hub-cache"), HF_HUB_DISABLE_XET="1",
                   CONVERT_FP8_NO_PROGRESS="1", **example.env)
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-m", "converter.cli", *example.argv[1:]], cwd=workdir,
                              capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stdout + done.stderr


def run_make(example: Example, workdir: Path, demo: Demo) -> tuple[int, str]:
    """make in the checkout, its virtual environment taken as installed (-o: not remade)."""
    targets, settings = make_args(example.argv)
    if settings.get("SRC"):
        demo.place(workdir, settings["SRC"], fp8=False)
    for key in ("SRC", "DST"):
        if settings.get(key) and not os.path.isabs(settings[key]):
            settings[key] = str(workdir / settings[key])
    argv = ["make", "-C", str(ROOT), "-o", ".venv/.installed", f"DEMO_DIR={workdir / 'demo'}",
            *[f"{k}={v}" for k, v in settings.items()], *targets]
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1", HF_HUB_OFFLINE="1", **example.env)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    return done.returncode, done.stdout + done.stderr


_DEMO: list[Demo] = []  # the session's, once a test has asked for it
_BLOCKS: dict[tuple[str, int], tuple[Path, set[int]]] = {}  # block -> (its scratch folder, indexes run there)


@pytest.fixture
def demo(gemma_src, gemma_dst) -> Demo:
    if not _DEMO:
        _DEMO.append(Demo(gemma_src, gemma_dst))
    return _DEMO[0]


def needed(example: Example) -> list[Example]:
    """The earlier examples of its block that write a path `example` names, and theirs, in block order."""
    block = [e for e in EXAMPLES if e.block == example.block and e.index < example.index]
    wanted, names = [], paths_of(example)
    for earlier in reversed(block):
        if writes(earlier) in names:
            wanted.append(earlier)
            names |= paths_of(earlier)
    return wanted[::-1]


@pytest.mark.parametrize("example", [pytest.param(e, id=e.id, marks=[pytest.mark.slow] if is_slow(e) and not e.skip
                                                  else []) for e in EXAMPLES])
def test_example(example: Example, request, tmp_path_factory):
    try:
        check(example)  # every option and target still exists, run or not
        gone = None
    except AssertionError as exc:
        gone = str(exc).splitlines()[0]
    if gone:
        pytest.fail(f"{example.id} `{example.text}`: {gone}", pytrace=False)
    if example.skip:
        pytest.skip(f"{example.id}: {example.skip}")
    demo = request.getfixturevalue("demo")  # built once the example is known to be runnable
    if example.block not in _BLOCKS:
        _BLOCKS[example.block] = (tmp_path_factory.mktemp("doc-example"), set())
    workdir, ran = _BLOCKS[example.block]
    for earlier in needed(example):
        if earlier.index not in ran:
            code, output = run(earlier, workdir, demo)
            assert code == 0, f"set-up example {earlier.id} `{earlier.text}` exited {code}:\n{output[-3000:]}"
            ran.add(earlier.index)
    code, output = run(example, workdir, demo)
    ran.add(example.index)
    assert code == 0, f"{example.id} `{example.text}` exited {code}:\n{output[-3000:]}"


def test_the_docs_have_examples_and_each_skip_gives_its_reason():
    assert len(EXAMPLES) >= 20
    assert {e.doc for e in EXAMPLES} >= {"README.md", "docs/usage.md", "docs/dialects.md", "docs/long-runs.md",
                                         "docs/checking.md", "docs/dequantize.md"}
    assert all(e.skip.strip() for e in EXAMPLES if e.skip is not None)
    assert any(e.argv[:2] == ["make", "convert"] and not e.skip for e in EXAMPLES if e.doc == "README.md")


def test_a_renamed_option_fails_the_check():
    example = parse_text("```sh\nconvert-fp8 --src model --out-dir model-FP8\n```\n")[0]
    with pytest.raises(AssertionError, match="has no option --out-dir"):
        check(example)
    example = parse_text("<!-- doc-test: skip (needs a GPU) -->\n```sh\nconvert-fp8 verify --dts x\n```\n")[0]
    assert example.skip == "needs a GPU"
    with pytest.raises(AssertionError, match="has no option --dts"):
        check(example)
    with pytest.raises(AssertionError, match="unexpected argument 'verfy'"):
        check(parse_text("```sh\nconvert-fp8 verfy --dst x\n```\n")[0])
    with pytest.raises(AssertionError, match="has no target bnech"):
        check(parse_text("```sh\nmake bnech\n```\n")[0])


def parse_text(text: str) -> list[Example]:
    return parse("docs/scratch.md", text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_link_between_the_pages_leads_somewhere():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        in_code = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", in_code):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such heading")
    assert not broken, "\n".join(broken)
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    for index in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        linked = {Path(t.partition("#")[0]).name for t in re.findall(r"\]\(([^)\s#]+\.md)", index.read_text())}
        assert pages <= linked, f"{index.relative_to(ROOT)} does not link {sorted(pages - linked)}"
