"""Every command README.md shows runs as written.

The shell commands of README's fenced code blocks (and the commands and flags in its inline code spans) are
checked against the real parsers, without starting anything: the CLI's argparse parser (and `serve`'s),
`build_engines.py`'s, the sweep's, the benchmarks', Locust's with the locustfile's options, Makefile
targets, the charts' values (rendered with the Helm SDK), the bundled tritonserver's flags, the Dockerfile's
build arguments and the package's extras. Placeholders (`<yy.mm>`, `GPU_HOST`, `...`) are replaced by a value
in `SUBSTITUTIONS`; a command no parser here can check is in `UNCHECKED`, with the reason.

The quick-start commands and Python snippets of "Two commands" and "The SDK and CLI" are also run for real
against the session's cpu-profile server (`test_readme_*_run_against_the_served_cpu_profile`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from chart_helpers import rendered_docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Placeholders, replaced in the text before it is split into words: (README text, value used here).
SUBSTITUTIONS = [
    ("<yy.mm>", "26.06"),                      # the NGC image tag
    ('"$PWD"', str(ROOT)),                     # docker -v "$PWD":/workspace
    ("x-api-key=...", "x-api-key=KEY"),        # a header's value
    ("GPU_HOST:8001", "gpu-host.example:8001"),
    ("CPU_HOST:8001", "cpu-host.example:8001"),
]
# Inline code spans: template notation, replaced before parsing (span text, value used here).
INLINE_SUBSTITUTIONS = [
    (" [int8 ...]", " int8"), ("[--calibration-images DIR]", "--calibration-images /data/calib"),
    ("[--grpc-tls-client-ca ca.crt]", "--grpc-tls-client-ca ca.crt"),
    ("--tritonserver PATH", "--tritonserver /opt/tritonserver/bin/tritonserver"),
    ("NAME=VALUE", "tritonvision-admin=secret"),
]

# Commands no parser in this repository can check, by the start of their README line: the reason.
UNCHECKED = {
    "curl -s https://example.com/cat.jpg": "downloads an example photo (curl's own flags); the `tritonvision "
                                           "classify -` it pipes into is checked",
    "diff <(jq": "compares the two JSON files with jq; the `classify --json` shape it reads "
                 "(`.[].predictions[].label`) is checked by running classify --json for real below",
    "kubectl port-forward": "needs a cluster; the Service name and port it forwards to are checked by rendering "
                            "the chart (test_kubectl_port_forward_names_the_charts_service)",
}
# Keys of third-party charts' values (no copy of those charts here): the key and the reason.
THIRD_PARTY_SET_KEYS = {
    ("prometheus-community/prometheus-adapter", "prometheus.url"):
        "the prometheus-adapter chart's own value (`prometheus.url`, next to `prometheus.port`, in its values.yaml); "
        "the project's values file given with -f is checked",
}
# Flags in inline code spans that belong to other programs (docker, trtexec, newer Triton releases than the
# bundled 2.51): the flag and whose it is.
FOREIGN_FLAGS = {
    "--shm-size": "docker run",
    "--ipc=host": "docker run",
    "--noTF32": "trtexec (TensorRT)",
    "--allow-client-shm=true": "tritonserver 2.68+ (NGC 26.04+), not in the bundled 2.51",
    "--http-max-input-size": "tritonserver 25.06+, not in the bundled 2.51",
}


# -- README extraction --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # line number of the first line inside the fence
    text: str


@dataclass(frozen=True)
class Command:
    line: int
    argv: tuple[str, ...]
    source: str  # the README line(s) it came from

    def __str__(self) -> str:
        return f"README.md:{self.line}: {shlex.join(self.argv)}"


def fenced_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            blocks.append(Block(m.group(1), i + 2, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


OPERATORS = {"|", "||", "&&", ";", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>&1"}


def split_commands(text: str, first_line: int = 1, variables: dict | None = None) -> list[Command]:
    """Shell text to simple commands: continuation lines joined, comments dropped, placeholders and `$VAR`s
    of earlier `VAR=value` lines substituted, split at pipes, `&&` and `;`, redirections removed; the
    command string of `bash -c` becomes commands of its own."""
    variables = {} if variables is None else variables
    commands: list[Command] = []
    logical, start = "", None
    for n, raw in enumerate(text.splitlines(), first_line):
        start = n if start is None else start
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        logical += raw
        source, logical, line = logical, "", start
        start = None
        for old, new in SUBSTITUTIONS:
            source = source.replace(old, new)
        lexer = shlex.shlex(source, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        if "<(" in source:  # process substitution: kept whole, UNCHECKED decides
            commands.append(Command(line, (source.strip(),), source))
            continue
        words = list(lexer)
        segment: list[str] = []
        for word in [*words, ";"]:
            if word in OPERATORS:
                commands += _simple(segment, line, source, variables)
                segment = []
            else:
                segment.append(word)
    return commands


def _simple(words: list[str], line: int, source: str, variables: dict) -> list[Command]:
    out: list[str] = []
    it = iter(words)
    for w in it:
        if w in REDIRECTIONS:
            next(it, None)
        else:
            out.append(re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), w))
    if not out:
        return []
    if len(out) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", out[0]):  # TAG=26.06
        name, value = out[0].split("=", 1)
        variables[name] = value
        return [Command(line, tuple(out), source)]
    for k in range(len(out) - 2):
        if out[k : k + 2] == ["bash", "-c"]:  # docker run IMAGE bash -c "...": the commands it runs
            return [Command(line, tuple(out[:k]), source), *split_commands(out[k + 2], line, variables)]
    return [Command(line, tuple(out), source)]


def readme_commands() -> list[Command]:
    commands = []
    for block in fenced_blocks():
        if block.lang in ("bash", "sh", "shell", "console"):
            commands += split_commands(block.text, block.line)
    return commands


def inline_spans() -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line (a span may wrap onto the next line)."""
    text, out = README.read_text(), []
    fenced = set()
    for b in fenced_blocks(text):
        fenced.update(range(b.line - 1, b.line + b.text.count("\n") + 2))
    lines = text.splitlines()
    prose = "\n".join("" if i + 1 in fenced else l for i, l in enumerate(lines))
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        out.append((prose.count("\n", 0, m.start()) + 1, re.sub(r"\s+", " ", m.group(1)).strip()))
    return out


# -- the real parsers ---------------------------------------------------------------------------------------
class ParseError(AssertionError):
    pass


def parse(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse's verdict: exit 2 with its message on an unknown flag or a bad value. Abbreviations are off:
    the README spells every option in full (`--arrival-rate` must not pass as a prefix of `--arrival-rates`)."""
    no_abbreviations(ap)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return ap.parse_args(argv)
    except SystemExit as exc:
        raise ParseError(f"{ap.prog} {shlex.join(argv)}: exit {exc.code}: {err.getvalue().strip()}") from None


def no_abbreviations(ap: argparse.ArgumentParser) -> None:
    ap.allow_abbrev = False
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                no_abbreviations(sub)


def load_script(relpath: str):
    """A script of this repository (benchmarks/*.py, loadtest/sweep.py) as a module, by its path."""
    path = ROOT / relpath
    name = f"readme_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def script_parser(relpath: str) -> argparse.ArgumentParser:
    module = load_script(relpath)
    assert hasattr(module, "parser"), f"{relpath} has no parser() to check its documented command line against"
    return module.parser()


def check_cli(argv: list[str]) -> None:
    from tritonvision._cli import parser as cli_parser
    from tritonvision_server.serve import parser as serve_parser

    # As _cli.main(): `tritonvision [-v] serve ...` goes to the server package's parser whole.
    if "serve" in argv and all(a in ("-v", "--verbose") for a in argv[: argv.index("serve")]):
        parse(serve_parser(), argv[argv.index("serve") + 1 :])
    else:
        parse(cli_parser(), argv)


def check_build_engines(argv: list[str]) -> None:
    from tritonvision_server.build_engines import parser as build_parser

    parse(build_parser(), argv)


def check_python(argv: list[str]) -> None:
    """`python SCRIPT args` or `python -m pytest args`."""
    if argv[:2] == ["-m", "pytest"]:
        for arg in argv[2:]:
            if not arg.startswith("-"):
                assert (ROOT / arg.split("::")[0]).exists(), f"pytest path {arg} does not exist"
        return
    script, rest = argv[0], argv[1:]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if Path(script).name == "build_engines.py":
        check_build_engines(rest)
    elif script == "loadtest/locustfile.py":
        assert rest == ["--help"], f"only `{script} --help` is checked, not {rest}"
        help_text = locustfile_help()
        for option in locustfile_options():
            assert option in help_text, f"`python {script} --help` does not list {option}"
    else:
        parse(script_parser(script), rest)


def check_make(argv: list[str]) -> None:
    mk = makefile()
    targets = [a for a in argv if "=" not in a and not a.startswith("-")]
    assert targets, "make without a target"
    for assignment in (a for a in argv if "=" in a):
        name, value = assignment.split("=", 1)
        assert f"$({name})" in mk.text, f"make variable {name} is used by no recipe"
        mk.overrides[name] = value
    for target in targets:
        assert target in mk.targets, f"make target {target!r} is not in the Makefile ({sorted(mk.targets)})"
        for recipe_line in mk.targets[target]:
            for command in split_commands(mk.expand(recipe_line)):
                dispatch(command)
    mk.overrides.clear()


def check_pip(argv: list[str]) -> None:
    assert argv[0] == "install", argv
    extras = package_extras()
    for target in argv[1:]:
        m = re.fullmatch(r"(.+?)(?:\[(.+)\])?", target)
        path, wanted = m.group(1), m.group(2)
        assert path in (".", "/workspace"), f"pip install {target}: not this project"
        for extra in (wanted or "").split(","):
            assert not extra or extra in extras, f"extra [{extra}] is not in pyproject.toml ({sorted(extras)})"


def package_extras() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed package's metadata
        from importlib.metadata import metadata

        return set(metadata("tritonvision").get_all("Provides-Extra"))
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_docker(argv: list[str]) -> None:
    if argv[0] == "build":
        opts = argparse.ArgumentParser(add_help=False)
        opts.add_argument("-f", "--file")
        opts.add_argument("--build-arg", action="append", default=[])
        opts.add_argument("-t", "--tag")
        opts.add_argument("context")
        args = parse(opts, argv[1:])
        dockerfile = (ROOT / args.file).read_text()
        for arg in args.build_arg:
            name = arg.split("=", 1)[0]
            assert re.search(rf"^ARG {name}\b", dockerfile, re.MULTILINE), f"{args.file} declares no ARG {name}"
        assert args.context == "."
    else:
        assert argv[0] == "run", argv  # its image's command, after `bash -c`, is a command of its own


def check_tritonserver(argv: list[str]) -> None:
    known = tritonserver_flags()
    for arg in argv:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"tritonserver 2.51 (bundled) has no {arg.split('=', 1)[0]}"


def check_shell_script(argv: list[str]) -> None:
    path = ROOT / argv[0]
    assert path.is_file() and os.access(path, os.X_OK), f"{argv[0]} is not an executable file"
    if argv[0] == "benchmarks/gpu_torch_host.sh":  # its arguments go to gpu_torch.py, after its own
        own = re.search(r'benchmarks/gpu_torch\.py"? (.*) "\$@"', path.read_text()).group(1)
        parse(script_parser("benchmarks/gpu_torch.py"), [*shlex.split(own.replace('"', "")), *argv[1:]])


def check_cp(argv: list[str]) -> None:
    sources = [a for a in argv if not a.startswith("-")][:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"cp: {src} is not in the repository"


def check_export(argv: list[str]) -> None:
    for assignment in argv:
        check_env_var(assignment.split("=", 1)[0])


def check_env_var(name: str) -> None:
    assert name in env_vars_read(), f"${name} is read nowhere in the code"


def dispatch(command: Command) -> None:
    argv = list(command.argv)
    whole = " ".join(argv)
    for prefix in UNCHECKED:
        if whole.startswith(prefix):
            return
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value cmd: the environment
        check_env_var(argv[0].split("=", 1)[0]) if argv[0].startswith("TRITONVISION_") else None
        argv = argv[1:]
    if not argv:
        return
    prog, rest = argv[0], argv[1:]
    if prog in ("tritonvision", ".venv/bin/tritonvision"):
        check_cli(rest)
    elif prog in ("build_engines.py", "./build_engines.py"):
        check_build_engines(rest)
    elif prog in ("python", "python3", ".venv/bin/python"):
        check_python(rest)
    elif prog == "make":
        check_make(rest)
    elif prog == "locust":
        check_locust([rest])
    elif prog == "helm":
        check_helm(rest, command)
    elif prog == "pip":
        check_pip(rest)
    elif prog == "docker":
        check_docker(rest)
    elif prog == "tritonserver":
        check_tritonserver(rest)
    elif prog.endswith(".sh"):
        check_shell_script(argv)
    elif prog == "cp":
        check_cp(rest)
    elif prog == "export":
        check_export(rest)
    else:
        pytest.fail(f"{command}: no check for {prog!r}; add one, or list the line in UNCHECKED with the reason")


# -- Makefile -----------------------------------------------------------------------------------------------
class Makefile:
    def __init__(self, path: Path):
        self.text = path.read_text()
        self.vars: dict[str, str] = {}
        self.targets: dict[str, list[str]] = {}
        self.overrides: dict[str, str] = {}
        current = None
        lines = self.text.replace("\\\n", " ").splitlines()
        for line in lines:
            if line.startswith("\t") and current is not None:
                self.targets[current].append(line.strip())
                continue
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$", line)
            if m:
                self.vars[m.group(1)] = m.group(3)
                current = None
                continue
            m = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)
            current = m.group(1) if m and not line.startswith(".") else None
            if current:
                self.targets[current] = []

    def expand(self, text: str, depth: int = 0) -> str:
        assert depth < 10, text

        def var(m):
            name = m.group(1)
            if name.startswith("abspath "):
                return self.expand(name[len("abspath "):], depth + 1)
            value = self.overrides.get(name, self.vars.get(name, ""))
            return self.expand(value, depth + 1)

        while (expanded := re.sub(r"\$\(([^()]*)\)", var, text)) != text:  # innermost first
            text = expanded
        return text


@functools.cache
def makefile() -> Makefile:
    return Makefile(ROOT / "Makefile")


# -- Helm ---------------------------------------------------------------------------------------------------
def set_key_path(key: str) -> list[str]:
    """Helm's --set key syntax: dots separate, a backslash escapes a dot."""
    return [part.replace("\\.", ".") for part in re.split(r"(?<!\\)\.", key)]


def key_exists(values: dict, schema: dict, path: list[str]) -> bool:
    node, sch = values, schema
    for part in path:
        props = (sch or {}).get("properties", {})
        if isinstance(node, dict) and part in node:
            node, sch = node[part], props.get(part, {})
        elif (sch or {}).get("additionalProperties") not in (None, False):
            node, sch = None, sch["additionalProperties"]  # a map of free keys (nodeSelector, annotations)
        elif part in props:
            node, sch = None, props[part]
        else:
            return False
    return True


def nested(path: list[str], value: str) -> dict:
    out: dict = {}
    cur = out
    for part in path[:-1]:
        cur = cur.setdefault(part, {})
    cur[path[-1]] = int(value) if value.isdigit() else value
    return out


INSTALLED_RELEASES: dict[str, str] = {}


def check_helm(argv: list[str], command: Command) -> None:
    yaml = pytest.importorskip("yaml")
    verb = argv[0]
    if verb == "test":
        (release,) = argv[1:]
        assert release in INSTALLED_RELEASES, f"helm test {release}: no `helm install {release}` before it"
        chart = INSTALLED_RELEASES[release]
        assert list((ROOT / chart / "templates" / "tests").glob("*.yaml")), f"{chart} has no test hook"
        return
    assert verb == "install", argv
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("release")
    opts.add_argument("chart")
    opts.add_argument("--set", action="append", default=[])
    opts.add_argument("-f", "--values", action="append", default=[])
    args = parse(opts, argv[1:])
    for f in args.values:
        assert (ROOT / f).is_file(), f"helm -f {f}: no such file"
    INSTALLED_RELEASES[args.release] = args.chart
    if not (ROOT / args.chart).is_dir():
        for item in args.set:
            key = item.split("=", 1)[0]
            assert (args.chart, key) in THIRD_PARTY_SET_KEYS, f"{command}: --set {key} of a chart not here"
        return
    values = yaml.safe_load((ROOT / args.chart / "values.yaml").read_text())
    schema = json.loads((ROOT / args.chart / "values.schema.json").read_text())
    overrides: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        path = set_key_path(key)
        assert key_exists(values, schema, path), f"--set {key}: no such value in {args.chart}/values.yaml"
        _merge(overrides, nested(path, value))
    render_chart(args.chart, overrides, args.release)  # the chart's schema takes the values


def _merge(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def render_chart(chart: str, values: dict, release: str) -> list[dict]:
    pytest.importorskip("helm_python", reason="the [deploy] extra (helm-python-sdk) is not installed")
    return rendered_docs(ROOT / chart, values, release)


# -- Locust (in a subprocess: importing Locust monkey-patches the process for gevent) --------------------------
LOCUST_CHECK = r"""
import json, sys
from locust.argument_parser import get_parser
from locust.util.load_locustfile import load_locustfile
results, loaded = [], {}
for argv in json.loads(sys.argv[1]):
    files = argv[argv.index("-f") + 1].split(",")
    classes, shapes = {}, []
    for f in files:
        if f not in loaded:
            loaded[f] = load_locustfile(f)
        classes.update(loaded[f][0]); shapes += loaded[f][1]
    if "parser" not in loaded:
        loaded["parser"] = get_parser(default_config_files=[])
        loaded["parser"].allow_abbrev = False  # the README spells options in full
    err = None
    try:
        opts = loaded["parser"].parse_args(argv)
        missing = [u for u in opts.user_classes if u not in classes]
        if missing:
            err = f"no user class {missing} in {files} (has {sorted(classes)})"
        elif len(files) > 1 and not shapes:
            err = f"no LoadTestShape in {files[1:]}"
    except SystemExit as exc:
        err = f"exit {exc.code}"
    results.append(err)
print("RESULTS " + json.dumps(results))
"""


def check_locust(argvs: list[list[str]]) -> None:
    proc = subprocess.run([sys.executable, "-c", LOCUST_CHECK, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    out = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert out, f"the Locust check did not finish: {proc.stderr[-3000:]}"
    errors = json.loads(out[-1][len("RESULTS "):])
    problems = [f"locust {shlex.join(a)}: {e}\n{proc.stderr[-1500:]}" for a, e in zip(argvs, errors) if e]
    assert not problems, "\n".join(problems)


@functools.cache
def locustfile_help() -> str:
    proc = subprocess.run([sys.executable, "loadtest/locustfile.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def locustfile_options() -> list[str]:
    """The options the locustfile registers (its `option("--name", ...)` calls)."""
    return re.findall(r'^\s*option\("(--[a-z-]+)"', (ROOT / "loadtest" / "locustfile.py").read_text(), re.MULTILINE)


# -- other programs' flags ----------------------------------------------------------------------------------
@functools.cache
def tritonserver_flags() -> frozenset[str]:
    from tritonvision_server.launcher import bundled_server_root

    binary = bundled_server_root() / "bin" / "tritonserver"
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, check=False)
    flags = frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout + proc.stderr))
    assert "--model-repository" in flags, (proc.stdout + proc.stderr)[-2000:]
    return flags


@functools.cache
def env_vars_read() -> frozenset[str]:
    """TRITONVISION_* names the code reads: a quoted name (`URL_ENV = "TRITONVISION_URL"`, `os.environ[...]`),
    or the locustfile's `_env("NAME", ...)`. Tests count: the Makefile hands them their variables."""
    names = set()
    for folder in ("client", "server", "loadtest", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() == Path(__file__).resolve():
                continue
            text = path.read_text()
            names |= set(re.findall(r"['\"](TRITONVISION_[A-Z0-9_]+)['\"]", text))
            names |= {f"TRITONVISION_{n}" for n in re.findall(r'\b_env\("([A-Z0-9_]+)"', text)}
    return frozenset(names)


@functools.cache
def all_project_flags() -> frozenset[str]:
    """Every option string of every parser a README command reaches."""
    from tritonvision._cli import parser as cli_parser
    from tritonvision_server.build_engines import parser as build_parser
    from tritonvision_server.serve import parser as serve_parser

    flags: set[str] = set()

    def walk(ap: argparse.ArgumentParser) -> None:
        for action in ap._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    for ap in (cli_parser(), build_parser(), serve_parser()):
        walk(ap)
    for script in documented_scripts():
        if hasattr(load_script(script), "parser"):
            walk(script_parser(script))
    flags.update(locustfile_options())
    flags.update(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", locustfile_help()))
    return frozenset(flags)


def documented_scripts() -> list[str]:
    scripts = {"loadtest/sweep.py"}
    for _, span in inline_spans():
        m = re.search(r"(benchmarks/\w+\.py)", span)
        if m:
            scripts.add(m.group(1))
        elif re.fullmatch(r"\w+\.py", span) and (ROOT / "benchmarks" / span).is_file():  # `bench_client.py`
            scripts.add(f"benchmarks/{span}")
    return sorted(s for s in scripts if (ROOT / s).is_file())


# -- the static checks --------------------------------------------------------------------------------------
COMMANDS = readme_commands()


def test_readme_has_the_commands_it_is_known_to_show():
    """The extraction itself: a README reorganised into other kinds of blocks must not leave this module
    checking nothing."""
    progs = {c.argv[0] for c in COMMANDS}
    assert {"make", ".venv/bin/tritonvision", "tritonvision", "locust", "helm", "docker"} <= progs, progs
    assert len(COMMANDS) >= 40, len(COMMANDS)
    spans = [s for _, s in inline_spans()]
    assert "build_engines.py dali --hw-decoder-load 0.65" in spans


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[0] != "locust"], ids=str)
def test_readme_command_parses_with_the_real_parser(command):
    if command.argv[0] == "helm" and command.argv[1] == "test":  # needs the installs before it
        for earlier in COMMANDS:
            if earlier.argv[:2] == ("helm", "install") and earlier.line < command.line:
                dispatch(earlier)
    dispatch(command)


def test_readme_locust_commands_parse_with_locusts_parser_and_the_locustfiles_options():
    argvs = [list(c.argv[1:]) for c in COMMANDS if c.argv[0] == "locust"]
    assert len(argvs) >= 6
    check_locust(argvs)


def test_every_unchecked_line_is_still_in_the_readme():
    text = README.read_text()
    for prefix in UNCHECKED:
        assert prefix in text, f"UNCHECKED lists {prefix!r}, which the README no longer shows"


def test_every_tritonvision_variable_the_readme_names_is_read_by_the_code():
    names = set(re.findall(r"\bTRITONVISION_[A-Z0-9_]*[A-Z0-9]\b", README.read_text()))
    assert names, "README names no TRITONVISION_* variable"
    missing = sorted(n for n in names if n not in env_vars_read())
    assert not missing, f"README names variables no code reads: {missing}"


def test_every_extra_the_readme_names_exists():
    text = README.read_text()
    named = set(re.findall(r"`\[([a-z-]+)\]`", text))  # `[images]`
    for group in re.findall(r"(?:\.|tritonvision)\[([a-z,-]+)\]", text):  # '.[build]', tritonvision[loadtest]
        named.update(group.split(","))
    assert {"images", "cuda", "cli", "loadtest", "deploy", "build", "gpu-torch"} <= named, named
    assert named <= package_extras(), f"README names extras pyproject.toml lacks: {sorted(named - package_extras())}"


def subcommands(ap: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_layout_tree_names_files_that_exist_and_every_subcommand():
    from tritonvision._cli import parser as cli_parser
    from tritonvision_server.build_engines import parser as build_parser

    (tree,) = [b for b in fenced_blocks() if b.lang == "" and "client/tritonvision/" in b.text]
    missing = [name for name in re.findall(r"\b(\w+\.py)\b", tree.text)
               if not any(ROOT.glob(f"**/{name}")) and name != "dali.py"]  # dali.py: written by `build_engines.py dali`
    assert not missing, f"the layout names files that do not exist: {missing}"
    cli = re.search(r"`tritonvision ([a-z| -]+)`", tree.text).group(1)
    assert {c.strip() for c in cli.split("|")} == subcommands(cli_parser()), cli
    build = re.search(r"^build_engines\.py .*?: ([a-z| -]+)$", tree.text, re.MULTILINE).group(1)
    assert {c.strip() for c in build.split("|")} == subcommands(build_parser()) - {"all"}, build  # all: gpu's alias


def test_the_build_engines_script_and_entry_point_are_the_same_command():
    import runpy
    from importlib.metadata import entry_points

    import tritonvision_server.build_engines as module

    script = runpy.run_path(str(ROOT / "build_engines.py"), run_name="readme_check")
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "build_engines.py"]
    assert script["main"] is module.main
    assert ep.load() is module.main


def test_kubectl_port_forward_names_the_charts_service():
    (cmd,) = [c for c in COMMANDS if c.argv[:2] == ("kubectl", "port-forward")]
    target, port = cmd.argv[2:]
    (install,) = [c for c in COMMANDS if c.argv[:2] == ("helm", "install") and "tritonvision-loadtest" in c.argv[3]]
    release, chart = install.argv[2], install.argv[3]
    docs = render_chart(chart, {}, release)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    name = target.removeprefix("svc/")
    assert name in services, f"{target}: the chart makes Services {sorted(services)}"
    assert int(port) in [p["port"] for p in services[name]["spec"]["ports"]]


INLINE_PROGRAMS = re.compile(r"^(?:\.venv/bin/)?(?:python3? )?(tritonvision|serve|build_engines\.py|benchmarks/\w+\.py|"
                             r"loadtest/sweep\.py)(?=\s|$)(.*)$")


def inline_commands() -> list[tuple[int, list[str]]]:
    out = []
    for line, span in inline_spans():
        for old, new in INLINE_SUBSTITUTIONS:
            span = span.replace(old, new)
        m = INLINE_PROGRAMS.match(span)
        if not m:
            continue
        prog, rest = m.group(1), m.group(2).strip()
        if not rest and not prog.endswith(".py"):  # `tritonvision` alone: the package's name, or a default
            continue
        if prog == "serve":
            if not rest.startswith("--") or "/" in rest:  # `serve --grpc-tls-cert/--grpc-tls-key`: flag names
                continue
            prog, rest = "tritonvision", f"serve {rest}"
        # `build_engines.py engine --precision {fp16,int8,tf32,fp32}`: each choice
        choices = re.search(r"\{([^}]+)\}", rest)
        variants = [rest.replace(choices.group(0), c) for c in choices.group(1).split(",")] if choices else [rest]
        out += [(line, [prog, *shlex.split(v)]) for v in variants]
    return out


@pytest.mark.parametrize("line,argv", inline_commands(), ids=lambda x: str(x) if isinstance(x, int) else " ".join(x))
def test_readme_inline_command_parses_with_the_real_parser(line, argv):
    prog, rest = argv[0], argv[1:]
    if prog == "tritonvision":
        from tritonvision._cli import parser as cli_parser

        sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
        assert rest[0] in sub.choices, f"README.md:{line}: tritonvision has no {rest[0]}"
        if len(rest) > 1:  # a name alone (`tritonvision probe`) names the command, its arguments are elsewhere
            check_cli(rest)
    elif prog == "build_engines.py":
        from tritonvision_server.build_engines import parser as build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        assert rest[0] in sub.choices, f"README.md:{line}: build_engines.py has no {rest[0]}"
        if len(rest) > 1:
            check_build_engines(rest)
    elif rest or hasattr(load_script(prog), "parser"):
        parse(script_parser(prog), rest)
    else:  # a benchmark named, not run: `benchmarks/queue_stall.py`
        assert (ROOT / prog).is_file(), f"README.md:{line}: {prog} does not exist"


def test_every_flag_in_the_readmes_prose_exists_somewhere():
    """An inline `--flag` names an option of a command the README documents, of the bundled tritonserver, or
    of another program listed in FOREIGN_FLAGS."""
    known = all_project_flags() | tritonserver_flags()
    unknown = []
    for line, span in inline_spans():
        for flag in re.findall(r"(?:^|[\s/(])(--[A-Za-z0-9][A-Za-z0-9-]*(?:=\S+)?)", span):
            name = flag.split("=", 1)[0]
            if flag in FOREIGN_FLAGS or name in FOREIGN_FLAGS or name in known:
                continue
            unknown.append(f"README.md:{line}: {flag} (in `{span}`)")
    assert not unknown, "\n".join(unknown)


def test_a_renamed_flag_fails_the_check(monkeypatch):
    """The check is not hollow: the CLI with `--top-k` renamed refuses the README's command."""
    import tritonvision._cli as cli

    real = cli.parser

    def renamed():
        ap = real()
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        classify = sub.choices["classify"]
        action = next(a for a in classify._actions if "--top-k" in a.option_strings)
        action.option_strings = ["--topk"]
        classify._option_string_actions.pop("--top-k")
        classify._option_string_actions["--topk"] = action
        return ap

    (cmd,) = [c for c in COMMANDS if c.argv[:3] == (".venv/bin/tritonvision", "classify", "--json")]
    dispatch(cmd)
    monkeypatch.setattr(cli, "parser", renamed)
    with pytest.raises(ParseError, match="unrecognized arguments: --top-k"):
        dispatch(cmd)


# -- the quick start, run for real ----------------------------------------------------------------------------
def python_blocks() -> list[Block]:
    return [b for b in fenced_blocks() if b.lang == "python"]


@pytest.fixture()
def quickstart_dir(tmp_path):
    """What a user would have next to them: photo.jpg, cat.jpg, a.jpg, b.png, photos/ and more/*.png."""
    from PIL import Image
    from tritonvision import sample_images

    samples = {p.name: p for p in sample_images()}
    for name, src in (("photo.jpg", "chelsea.jpg"), ("cat.jpg", "chelsea.jpg"), ("a.jpg", "coffee.jpg")):
        shutil.copy(samples[src], tmp_path / name)
    Image.open(samples["astronaut.jpg"]).save(tmp_path / "b.png")
    (tmp_path / "photos").mkdir()
    (tmp_path / "more").mkdir()
    for p in samples.values():
        shutil.copy(p, tmp_path / "photos" / p.name)
    Image.open(samples["coffee.jpg"]).save(tmp_path / "more" / "coffee.png")
    return tmp_path


def run_snippet(code: str, url: str, prelude: str = "") -> dict:
    """Run a README snippet with its address replaced by the session server's; top-level `async with` (valid
    in an asyncio REPL or a notebook) is wrapped into a coroutine run by asyncio.run()."""
    assert code.count('"127.0.0.1:8001"') >= 1, code
    code = code.replace('"127.0.0.1:8001"', repr(url))
    lines = code.splitlines()
    k = next((i for i, line in enumerate(lines) if line.startswith("async ")), len(lines))
    sync, rest = "\n".join(lines[:k]), "\n".join(lines[k:])
    program = prelude + sync + "\n"
    if rest:
        program += "async def _readme_async():\n" + textwrap.indent(rest, "    ") + "\n    return locals()\n"
        program += "globals().update(asyncio.run(_readme_async()))\n"
    out = io.StringIO()
    namespace: dict = {"asyncio": asyncio}
    with contextlib.redirect_stdout(out):
        exec(compile(program, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    namespace["_stdout"] = out.getvalue()
    return namespace


def test_readme_quick_start_snippet_runs_against_the_served_cpu_profile(grpc_url, quickstart_dir, monkeypatch):
    monkeypatch.chdir(quickstart_dir)
    (block,) = [b for b in python_blocks() if b.text.startswith("from tritonvision import Classifier")]
    ns = run_snippet(block.text, grpc_url)
    rows = ns["_stdout"].splitlines()
    assert len(rows) == 5, ns["_stdout"]
    for row in rows:
        score, index, label = row.split(maxsplit=2)
        assert 0 <= float(score) <= 1 and 0 <= int(index) < 1000 and label


SDK_PRELUDE = """
from tritonvision import sample_images
paths = [str(p) for p in sample_images()]
def endless_camera_frames():   # endless in the README; six frames here
    for i in range(6):
        yield open(paths[i % len(paths)], "rb").read()
async def frames():
    for i in range(4):
        yield open(paths[i % len(paths)], "rb").read()
"""


def test_readme_sdk_snippet_runs_against_the_served_cpu_profile(grpc_url, quickstart_dir, monkeypatch):
    monkeypatch.chdir(quickstart_dir)
    (block,) = [b for b in python_blocks() if b.text.startswith("import tritonvision as tv")]
    ns = run_snippet(block.text, grpc_url, SDK_PRELUDE)
    assert len(ns["top5"]) == 5 and all(p.label for p in ns["top5"])
    assert len(ns["many"]) == len(ns["paths"]) and all(isinstance(r, list) for r in ns["many"]), ns["many"]
    out = ns["_stdout"].splitlines()
    streamed = [line.split(" ", 1) for line in out[:6]]
    assert [int(i) for i, _ in streamed] == list(range(6)), out  # in order, each with its top label
    assert all(label and "Error" not in label for _, label in streamed), out
    table = "\n".join(out[6:])
    for step in ("classifier", "preprocess", "resnet50"):
        assert step in table, table
    assert ns["c"].ok  # the async stream's last result


def cli_lines(block_start: str) -> list[Command]:
    (block,) = [b for b in fenced_blocks() if b.lang == "bash" and b.text.lstrip().startswith(block_start)]
    return split_commands(block.text, block.line)


def run_cli(argv, cwd: Path, url: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tritonvision"
    assert argv[0] in ("tritonvision", ".venv/bin/tritonvision"), argv
    env = {**os.environ, "TRITONVISION_URL": url}
    return subprocess.run([str(exe), *argv[1:]], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=180,
                          check=False)


def test_readme_two_commands_cli_lines_run_against_the_served_cpu_profile(grpc_url, quickstart_dir):
    first, second = cli_lines(".venv/bin/tritonvision classify photo.jpg")
    proc = run_cli(first.argv, quickstart_dir, grpc_url)
    assert proc.returncode == 0, proc.stderr.decode()
    name, *rows = proc.stdout.decode().splitlines()
    assert name == "photo.jpg", proc.stdout.decode()
    assert len(rows) == 5 and all(len(r.split(maxsplit=2)) == 3 for r in rows), rows  # top-5: score, index, label
    proc = run_cli(second.argv, quickstart_dir, grpc_url)
    assert proc.returncode == 0, proc.stderr.decode()
    answers = json.loads(proc.stdout)
    assert [a["image"] for a in answers] == ["a.jpg", "b.png"]
    assert all(len(a["predictions"]) == 3 for a in answers)
    # The GPU section's `jq -c '[.[].predictions[].label]'` reads exactly this shape.
    assert all(isinstance(p["label"], str) for a in answers for p in a["predictions"])


def test_readme_sdk_and_cli_block_runs_against_the_served_cpu_profile(grpc_url, quickstart_dir):
    """The block of "The SDK and CLI", each line as written, except: $TRITONVISION_URL is the session server
    (not tv.example.com), curl's download is cat.jpg read from disk, `stats --interval 10` and `bench
    --seconds 10` measure 1 s; the TLS line needs a TLS server (tests/test_tls.py runs those options)."""
    commands = cli_lines("export TRITONVISION_URL=")
    export, classify, curl, piped, stats, bench, tls = commands
    assert export.argv[0] == "export" and export.argv[1].startswith("TRITONVISION_URL=")
    assert curl.argv[0].startswith("curl") and "--root-certificates" in tls.argv

    proc = run_cli(classify.argv, quickstart_dir, grpc_url)
    assert proc.returncode == 0, proc.stderr.decode()
    answers = json.loads(proc.stdout)
    assert sorted(a["image"] for a in answers) == sorted(
        [f"photos/{p.name}" for p in (quickstart_dir / "photos").iterdir()] + ["more/coffee.png"])
    assert all(len(a["predictions"]) == 3 for a in answers)

    proc = run_cli(piped.argv, quickstart_dir, grpc_url, stdin=(quickstart_dir / "cat.jpg").read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines()[0] == "-" and len(proc.stdout.decode().splitlines()) == 6, proc.stdout

    argv = [*stats.argv]
    argv[argv.index("--interval") + 1] = "3"
    exe = Path(sys.executable).parent / "tritonvision"
    stats_proc = subprocess.Popen([str(exe), *argv[1:]], cwd=quickstart_dir, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITONVISION_URL": grpc_url})
    try:
        seen = []
        while not any("measuring for 3 s" in line for line in seen):  # its first snapshot is taken: send traffic
            seen.append(stats_proc.stderr.readline())
            assert seen[-1], f"stats ended before measuring: {seen}"
        from tritonvision import Classifier

        with Classifier(grpc_url, timeout=60) as clf:
            clf.classify_batch(sorted((quickstart_dir / "photos").iterdir()))
        text, _ = stats_proc.communicate(timeout=60)
    finally:
        stats_proc.kill()
    assert stats_proc.returncode == 0
    assert f"Triton statistics at {grpc_url} " in text, text
    for step in ("classifier", "preprocess", "resnet50"):
        assert re.search(rf"^{step}\s", text, re.MULTILINE), text

    argv = [*bench.argv]
    argv[argv.index("--seconds") + 1] = "1"
    proc = run_cli(argv, quickstart_dir, grpc_url)
    assert proc.returncode == 0, proc.stderr.decode()
    levels = [line.split()[0] for line in proc.stdout.decode().splitlines()[1:]]
    assert levels == ["1", "4", "16"], proc.stdout.decode()
