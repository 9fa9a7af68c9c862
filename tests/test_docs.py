"""Every fenced code block of README.md and docs/*.md, checked, so that no
documented example or command goes stale.

- ```python blocks run in order, one namespace per page (like a notebook),
  on the CPU, in a scratch directory per page, with a TORCH_HOME whose
  hub/checkpoints/ holds randomly initialised weights under the file names
  of torchvision's URLs (so weights="DEFAULT" and torchvision's enums load
  without network; downloading is made to fail). A block that cannot run on
  a CPU-only machine without network is marked just before it with
  `<!-- not run: REASON -->`: it is skipped with that reason, and only
  compiled.
- ```bash / ```sh / ```console blocks: `resnet-fast` and `python -m
  resnet_fast` commands (also under torchrun) are parsed with the command's
  own parser, `python -m benchmarks` and `bash scripts/bench.sh` arguments
  with the benchmark's; modules run with `python -m` must exist, and so must
  the files given to bash, `pip install -r`, pytest, python and git; `pip
  install` extras of resnet_fast must be declared in pyproject.toml.
- ```text blocks that list paths (a layout) name existing paths.
- Every relative link points to an existing file, and its #anchor to a
  heading of that page.
"""
import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import sys
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is imported from the source tree
    sys.path.insert(0, str(ROOT))

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run\s*:?(?P<reason>.*?)-->\s*$", re.IGNORECASE)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str]  # the marker's reason ("" if the marker has none), None without a marker

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_page(page: Path):
    """(blocks, prose lines with code blocks blanked out, problems)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    prose = list(lines)
    problems: List[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence = i, m.group("fence")
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            j += 1
        if j == len(lines):
            problems.append(f"{page.relative_to(ROOT)}:{start + 1}: code block never closed")
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start + 1:j])
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NOT_RUN.match(lines[k]) if k >= 0 else None
        blocks.append(Block(page, start + 1, m.group("lang").lower(), code,
                            marker.group("reason").strip() if marker else None))
        for n in range(start, min(j + 1, len(lines))):
            prose[n] = ""
        i = j + 1
    # A marker must sit just before a code block.
    marked = {b.line for b in blocks if b.not_run is not None}
    for n, line in enumerate(prose):
        if NOT_RUN.match(line):
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k + 1 not in marked:
                problems.append(f"{page.relative_to(ROOT)}:{n + 1}: "
                                "a 'not run' marker that is not just before a code block")
    return blocks, prose, problems


PARSED = {page: parse_page(page) for page in PAGES}
BLOCKS = [block for page in PAGES for block in PARSED[page][0]]


def blocks_of(*langs: str) -> List[Block]:
    return [b for b in BLOCKS if b.lang in langs]


def params(blocks: List[Block]):
    return [pytest.param(b, id=b.name) for b in blocks]


def test_pages_and_blocks_found():
    assert (ROOT / "README.md") in PARSED and len(PAGES) > 1, "README.md and docs/*.md"
    readme = PARSED[ROOT / "README.md"][0]
    assert any(b.lang == "python" for b in readme) and any(b.lang == "bash" for b in readme)
    problems = [p for page in PAGES for p in PARSED[page][2]]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", params(BLOCKS))
def test_block_has_a_known_language(block):
    assert block.lang in {"python", "text", *SHELL_LANGS}, (
        f"{block.name}: a code block needs a language this test checks (python, bash, sh, console, text); "
        f"got {block.lang or 'none'!r}")
    if block.not_run is not None:
        assert block.lang == "python", f"{block.name}: only python blocks are run, so only they take a 'not run' marker"


# --------------------------------------------------------------------------
# python blocks


RESNET_WEIGHTS = ("ResNet18_Weights", "ResNet50_Weights")


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """A TORCH_HOME with every ResNet-18/50 weights file of torchvision in
    its hub cache (random weights, torchvision's file names), a plan cache
    and a scratch directory per page."""
    torchvision = pytest.importorskip("torchvision")
    base = tmp_path_factory.mktemp("docs")
    checkpoints = base / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    for enum_name in RESNET_WEIGHTS:
        enum = getattr(torchvision.models, enum_name)
        builder = getattr(torchvision.models, enum_name[: -len("_Weights")].lower())
        state = builder(weights=None).state_dict()  # torchvision's random initialisation
        first = None
        for entry in enum:
            path = checkpoints / os.path.basename(entry.url)
            if path.exists():  # DEFAULT is an alias of another entry
                continue
            if first is None:
                torch.save(state, path)
                first = path
            else:  # the same content under each file name
                shutil.copyfile(first, path)
    return {"torch_home": base / "torch_home", "plans": base / "plans", "work": base / "work"}


@dataclass
class PageRun:
    namespace: dict
    done: set
    failed: Optional[int] = None  # line of the block that failed


_runs: Dict[Path, PageRun] = {}


def _no_download(*args, **kwargs):
    raise RuntimeError("tests/test_docs.py: a documented example tried to download "
                       f"({args[0] if args else kwargs}); the weights it needs should be in the test's TORCH_HOME")


def _exec_block(block: Block, run: PageRun) -> None:
    """Run a block in its page's namespace; a failure is reported with the
    markdown page's line numbers (and the innermost frame), not pytest's
    listing of the whole page."""
    code = compile("\n" * block.line + block.code, str(block.page), "exec")
    try:
        exec(code, run.namespace)
    except Exception as exc:
        run.failed = block.line
        frames = traceback.extract_tb(exc.__traceback__)
        shown = [f for f in frames if f.filename == str(block.page)]
        if frames and frames[-1].filename != str(block.page):
            shown.append(frames[-1])
        where = "".join(traceback.format_list(shown))
        pytest.fail(f"{block.name}: the block raised\n{where}{type(exc).__name__}: {exc}", pytrace=False)
    finally:
        run.done.add(block.line)


@pytest.mark.parametrize("block", params(blocks_of("python")))
def test_python_block(block, docs_env, monkeypatch):
    if block.not_run is not None:
        assert block.not_run, f"{block.name}: a 'not run' marker must say why (<!-- not run: REASON -->)"
        compile(block.code, block.name, "exec")
        pytest.skip(f"not run: {block.not_run}")
    work = docs_env["work"] / block.page.relative_to(ROOT).as_posix().replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("TORCH_HOME", str(docs_env["torch_home"]))
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(docs_env["plans"]))
    if hasattr(torch.hub, "_hub_dir"):  # torch.hub.set_dir() would win over TORCH_HOME
        monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm hub names: no network either
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    if hasattr(torch.hub, "urlopen"):
        monkeypatch.setattr(torch.hub, "urlopen", _no_download)

    run = _runs.setdefault(block.page, PageRun({"__name__": "__docs__"}, set()))
    # The blocks before this one on the page, in order (they ran already
    # unless this test was selected alone).
    for earlier in PARSED[block.page][0]:
        if earlier.line >= block.line:
            break
        if earlier.lang != "python" or earlier.not_run is not None:
            continue
        if run.failed is not None:
            break
        if earlier.line not in run.done:
            _exec_block(earlier, run)
    if run.failed is not None and run.failed != block.line:
        pytest.fail(f"{block.name} needs the blocks before it; the one at line {run.failed} failed")
    with torch.device("cpu"):
        _exec_block(block, run)


# --------------------------------------------------------------------------
# shell blocks


def shell_commands(block: Block) -> List[List[str]]:
    """The commands of a block as argument lists: continuation lines joined,
    comments dropped, `&&`, `||`, `;` and `|` split, console output skipped."""
    text = block.code.replace("\\\n", " ")
    lines = text.splitlines()
    if block.lang == "console":
        lines = [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]
        assert lines, f"{block.name}: a console block needs `$ ` before each command"
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: List[str] = []
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    stripped = []
    for argv in commands:
        while argv and ENV_ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        if argv:
            stripped.append(argv)
    return stripped


def _parse(parser_name: str, parse, args: List[str]) -> None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse(args)
    except SystemExit as exc:
        raise AssertionError(f"{parser_name} refuses {shlex.join(args)!r}: {stderr.getvalue().strip()}") from exc


def check_cli(args: List[str]) -> None:
    from resnet_fast.cli import build_parser

    _parse("resnet-fast", build_parser().parse_args, args)


def check_benchmarks(args: List[str]) -> None:
    from benchmarks.__main__ import parse_args

    _parse("python -m benchmarks", parse_args, args)


def check_exists(path: str, what: str) -> None:
    assert (ROOT / path).exists(), f"{what} {path!r} does not exist"


def looks_like_path(token: str) -> bool:
    return not token.startswith("-") and "://" not in token and ("/" in token or token.endswith((".py", ".sh")))


def check_pytest(args: List[str]) -> None:
    for token in args:
        if looks_like_path(token):
            check_exists(token.split("::")[0], "pytest path")


def declared_extras() -> Optional[set]:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return None
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"].get("optional-dependencies", {}))


def check_pip(args: List[str]) -> None:
    assert args, "pip without a command"
    for option, value in zip(args, args[1:]):
        if option in ("-r", "--requirement", "-c", "--constraint"):
            check_exists(value, "requirements file")
    extras = declared_extras()
    for token in args:
        m = re.fullmatch(r"resnet[_-]fast\[(.*)\]", token)
        if m and extras is not None:
            missing = {e.strip() for e in m.group(1).split(",")} - extras
            assert not missing, (f"pip install {token}: extras {sorted(missing)} "
                                 f"are not in pyproject.toml ({sorted(extras)})")


def check_module(module: str, args: List[str]) -> None:
    if module == "resnet_fast":
        check_cli(args)
    elif module == "benchmarks":
        check_benchmarks(args)
    elif module == "pytest":
        check_pytest(args)
    elif module == "pip":
        check_pip(args)
    else:
        base = ROOT / module.replace(".", "/")
        found = base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
        if not found:
            found = importlib.util.find_spec(module) is not None
        assert found, f"python -m {module}: no such module"


def check_python(args: List[str]) -> None:
    if args[:1] == ["-m"]:
        assert len(args) > 1, "python -m without a module"
        check_module(args[1], args[2:])
    else:
        assert args and args[0].endswith(".py"), f"python {shlex.join(args)}: expected -m MODULE or a script"
        check_exists(args[0], "script")


def check_torchrun(args: List[str]) -> None:
    if "-m" in args:
        i = args.index("-m")
        assert i + 1 < len(args), "torchrun -m without a module"
        check_module(args[i + 1], args[i + 2:])
    else:
        scripts = [i for i, token in enumerate(args) if token.endswith(".py")]
        assert scripts, f"torchrun {shlex.join(args)}: expected -m MODULE or a script"
        check_exists(args[scripts[0]], "script")


def check_bash(args: List[str]) -> None:
    assert args, "bash without a script"
    script = args[0]
    check_exists(script, "script")
    if script == "scripts/bench.sh":  # passes its arguments to python -m benchmarks
        check_benchmarks(args[1:])
    elif script in ("scripts/test.sh", "scripts/test_gpu_versions.sh"):  # pass theirs to pytest
        check_pytest(args[1:])


def check_git(args: List[str]) -> None:
    for token in args[1:]:
        if looks_like_path(token):
            check_exists(token, "path")


COMMANDS = {
    "resnet-fast": check_cli,
    "python": check_python,
    "python3": check_python,
    "torchrun": check_torchrun,
    "bash": check_bash,
    "sh": check_bash,
    "pip": check_pip,
    "pip3": check_pip,
    "pytest": check_pytest,
    "git": check_git,
}


@pytest.mark.parametrize("block", params(blocks_of(*SHELL_LANGS)))
def test_shell_block(block):
    commands = shell_commands(block)
    assert commands, f"{block.name}: no command in the block"
    for argv in commands:
        check = COMMANDS.get(argv[0])
        assert check is not None, (
            f"{block.name}: {shlex.join(argv)!r}: tests/test_docs.py does not know how to check {argv[0]!r}; "
            f"teach it (COMMANDS) rather than leave the command unchecked")
        try:
            check(argv[1:])
        except AssertionError as exc:
            raise AssertionError(f"{block.name}: {shlex.join(argv)!r}: {exc}") from None


# --------------------------------------------------------------------------
# text blocks and links


@pytest.mark.parametrize("block", params(blocks_of("text")))
def test_text_block(block):
    """A block that lists paths (a layout: each unindented line starts with
    a path) names existing ones; other text (printed output) is shown as is."""
    entries = [line.split()[0] for line in block.code.splitlines() if line.strip() and not line[0].isspace()]
    if entries and all("/" in entry for entry in entries):
        missing = [e for e in entries if not (ROOT / e.rstrip("/")).exists()]
        assert not missing, f"{block.name}: the layout names paths that do not exist: {missing}"


def github_anchors(page: Path) -> set:
    """The anchors GitHub gives a page's headings."""
    anchors, seen = set(), {}
    blocks_removed = PARSED[page][1] if page in PARSED else page.read_text(encoding="utf-8").splitlines()
    for line in blocks_removed:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES])
def test_links(page):
    bad = []
    prose = PARSED[page][1]
    for number, line in enumerate(prose, 1):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for m in LINK.finditer(line):
            target = m.group("target").strip("<>")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not resolved.exists():
                bad.append(f"{where} (no such file)")
                continue
            if ROOT not in resolved.parents and resolved != ROOT:
                bad.append(f"{where} (outside the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved):
                bad.append(f"{where} (no heading with that anchor)")
    assert not bad, "broken links:\n" + "\n".join(bad)
