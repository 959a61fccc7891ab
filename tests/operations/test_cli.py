"""The ``losswire`` command line as a person meets it: bad values, mistyped flags, each subcommand's help,
output piped into ``head``, and how long a command that needs no torch takes to start.

The in-process tests call the parser and the settings' resolution directly; the others run the installed
``losswire`` script (or ``python -m losswire.server``) in a subprocess, as an operator would.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from support.servers import ServerProcess, losswire_script, module_cmd, serve_cmd, server_env

from losswire.server import cli
from losswire.server.cli import HEALTH_KNOBS, KNOBS, KnobError, build_parser, check_device, resolve_with_sources
from losswire.server.config import ServerConfig

TIMEOUT = 120.0  # a hang guard for commands that import torch on a loaded machine


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [losswire_script(), *args],
        env=server_env(COLUMNS="100", **env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# -- --device: checked before anything starts, naming where the value came from -------------------------


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "CPU", " cuda:1 "])
def test_device_accepts_what_torch_can_run_losses_on(text):
    settings, sources = resolve_with_sources(build_parser().parse_args(["serve", "--device", text]), environ={})
    assert settings["device"] == text.strip().lower()
    assert sources["device"] == "--device"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("gpu", "a GPU is cuda, or cuda:N"),
        ("cuda:x", "N in cuda:N is a GPU's index"),
        ("cuda:-1", "N in cuda:N is a GPU's index"),
        ("mps", "losswire computes on the CPU or on a CUDA GPU"),
        ("", "losswire computes on the CPU or on a CUDA GPU"),
    ],
)
def test_a_bad_device_names_the_flag_the_variable_or_the_file_key(tmp_path, text, reason):
    expected = f"expected auto, cpu, cuda or cuda:N, got {text!r} ({reason}"
    with pytest.raises(KnobError, match=r"^--device: ") as by_flag:
        resolve_with_sources(build_parser().parse_args(["serve", "--device", text]), environ={})
    assert expected in str(by_flag.value)
    with pytest.raises(KnobError, match=r"^LOSSWIRE_DEVICE: ") as by_env:
        resolve_with_sources(build_parser().parse_args(["serve"]), environ={"LOSSWIRE_DEVICE": text})
    assert expected in str(by_env.value)
    config = tmp_path / "losswire.toml"
    config.write_text(f'device = "{text}"\n')
    with pytest.raises(KnobError) as by_file:
        resolve_with_sources(build_parser().parse_args(["serve", "--config", str(config)]), environ={})
    assert str(by_file.value).startswith(f"--config {config}: key device: {expected}")


@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("--device", "--device cuda:1"),
        ("LOSSWIRE_DEVICE", "LOSSWIRE_DEVICE=cuda:1"),
        ("--config f: key device", '--config f: key device = "cuda:1"'),
    ],
)
def test_a_cuda_device_must_exist_here(monkeypatch, where, named):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KnobError) as unavailable:
        check_device("cuda:1", where)
    assert str(unavailable.value).startswith(f"{named}: CUDA is not available on this machine")
    assert str(unavailable.value).endswith("; use cpu or auto")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(KnobError) as out_of_range:
        check_device("cuda:1", where)
    assert str(out_of_range.value) == f"{named}: this machine has 1 CUDA device(s), cuda:0 to cuda:0"
    check_device("cuda:0", where)  # exists: no error
    check_device("cuda", where)
    check_device("cpu", where)  # never asks torch


@pytest.mark.slow  # subprocesses
def test_bad_devices_exit_2_with_a_message_and_no_traceback(tmp_path):
    config = tmp_path / "losswire.toml"
    config.write_text('device = "gpu"\n')
    for result, message in [
        (run("serve", "--device", "gpu"), "losswire serve: --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (run("--device", "cuda:x"), "losswire serve: --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (run("serve", LOSSWIRE_DEVICE="gpu"), "losswire serve: LOSSWIRE_DEVICE: expected auto, cpu, cuda or cuda:N"),
        (run("serve", "--config", str(config)), f"losswire serve: --config {config}: key device: expected auto"),
    ]:
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow  # subprocesses that import torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda would start")
def test_cuda_without_cuda_exits_2_naming_the_setting():
    by_env = run("serve", "--host", "127.0.0.1", "--port", "0", LOSSWIRE_DEVICE="cuda:1")
    assert by_env.returncode == 2, by_env.stderr
    assert by_env.stderr.startswith("losswire serve: LOSSWIRE_DEVICE=cuda:1: CUDA is not available on this machine")
    assert "Traceback" not in by_env.stderr and "listening" not in by_env.stderr, by_env.stderr


@pytest.mark.slow  # a server subprocess
def test_a_port_in_use_exits_2_naming_it():
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: gRPC cannot share its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "cannot start: " in line]
    assert f"127.0.0.1:{port}" in line and "another process listens" in line, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow  # server subprocesses
def test_a_second_server_on_a_busy_port_fails_unless_both_reuse_it():
    argv = serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--reuse-port", "on")
    first = ServerProcess(argv, server_env()).wait_started()
    try:
        same_port = ["--host", "127.0.0.1", "--port", str(first.port), "--device", "cpu"]
        alone = run("serve", *same_port)  # without --reuse-port: refused, naming the flag
        assert alone.returncode == 2, alone.stderr
        assert "cannot start: " in alone.stderr and "--reuse-port" in alone.stderr, alone.stderr
        second = ServerProcess(serve_cmd(*same_port, "--reuse-port", "on"), server_env()).wait_started()
        second.close()
        assert second.port == first.port
    finally:
        first.close()


def test_every_server_setting_has_a_flag():
    """A ServerConfig field without a knob could only be set in code: every one is a flag, variable and key."""
    fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"auth_tokens"}  # tokens: env only
    assert fields == {k.field or k.name for k in KNOBS if k.field != ""}


# -- help: each subcommand its own flags, defaults as the flag takes them ----------------------------------


def options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_each_subcommand_has_only_its_own_flags():
    commands = build_parser().commands
    serve_flags = {"--plugin" if k.name == "plugins" else k.flag for k in KNOBS}
    assert options(commands["serve"]) == {"-h", "--help", "--config", *serve_flags}
    assert options(commands["health"]) == {
        "-h",
        "--help",
        "--service",
        "--timeout",
        "--config",
        *(k.flag for k in HEALTH_KNOBS),
    }
    assert options(commands["losses"]) == {"-h", "--help", "--plugin", "--json", "--markdown"}


def test_defaults_are_shown_as_the_flag_takes_them():
    for knob in KNOBS:
        if knob.shown is None:  # the shown text, given back as the flag's value, is the default again
            assert knob.parse(knob.shown_default) == knob.default, knob.name
        assert knob.shown_default not in ("True", "False", "None", "()"), knob.name
    assert cli.KNOBS_BY_NAME["fused_kernels"].shown_default == "on"
    assert cli.KNOBS_BY_NAME["metrics_port"].shown_default == "none"


@pytest.mark.slow  # subprocesses
def test_help_of_each_subcommand():
    serve = run("serve", "--help")
    assert serve.returncode == 0, serve.stderr
    assert "default True" not in serve.stdout and "default False" not in serve.stdout
    assert "LOSSWIRE_FUSED_KERNELS; file key fused_kernels; default on]" in " ".join(serve.stdout.split())
    health = run("health", "--help")
    assert health.returncode == 0, health.stderr
    assert "--max-workers" not in health.stdout and "--tls-key" not in health.stdout
    assert {"--service", "--timeout", "--config", "--host", "--port", "--health-port"} <= set(health.stdout.split())


# -- a mistyped flag: the subcommand's usage and the flags it resembles -------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["serve", "--prot", "1"], "usage: losswire serve ", "--prot: did you mean --port"),
        (["serve", "--lgo-level=debug"], "usage: losswire serve ", "--lgo-level: did you mean --log-level?"),
        (["health", "--servce", "x"], "usage: losswire health ", "--servce: did you mean --service?"),
        (["losses", "--jsno"], "usage: losswire losses ", "--jsno: did you mean --json?"),
    ],
)
def test_a_mistyped_flag_shows_the_subcommands_usage_and_close_matches(capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert f"losswire {argv[0]}: error: unrecognized arguments: " in err
    assert hint in err, err


def test_flags_before_any_command_mean_serve(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--prot", "1"])
    assert capsys.readouterr().err.startswith("usage: losswire serve ")


# -- output into a pipe that closes early -------------------------------------------------------------------


@pytest.mark.slow  # a subprocess that imports torch
def test_losses_into_a_closed_pipe_ends_quietly():
    """``losswire losses | head -1``: the reader is gone before the listing is written."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write meets a broken pipe
    try:
        result = subprocess.run(
            [losswire_script(), "losses", "--json"],
            env=server_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == -signal.SIGPIPE  # as `yes | head -1` ends `yes`


@pytest.mark.slow  # a subprocess that imports torch
def test_python_m_losswire_server_is_the_whole_command_line():
    listing = subprocess.run(
        module_cmd("losses"), env=server_env(), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert listing.stdout.startswith("AssociativeEmbeddingLoss ")
    version = subprocess.run(module_cmd("--version"), env=server_env(), capture_output=True, text=True, check=True)
    assert version.stdout.startswith("losswire ")


# -- start-up cost: only serve and losses import torch and the server --------------------------------------

HEAVY = ("torch", "losswire.server.app", "losswire.server.losses")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["serve", "--help"], ["health", "--help"], ["health", "--port", "9", "--timeout", "0.2"]],
    ids=["help", "serve-help", "health-help", "health"],
)
def test_commands_that_need_no_torch_do_not_import_it(argv):
    probe = (
        "import sys\nfrom losswire.server import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=server_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert "LOADED:" in result.stderr, result.stderr
    loaded = result.stderr.rpartition("LOADED:")[2].strip()
    assert loaded == "", f"`losswire {' '.join(argv)}` imported {loaded}:\n{result.stderr}"
