"""The vcemri program: only working commands, one-line errors, exit codes, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.tools import unavailable

from config import (
    ConfigError,
    InputError,
    ModelError,
    PeerError,
    StorageError,
    VcemriError,
    load_settings,
)
from vcemri import __version__, cli

BROKEN_CONFIGS = {
    "bad-port": "dicom:\n  port: 70000\n",
    "unknown-key": "storage:\n  rot: /srv\n",
    "missing-destination-host": "destinations:\n  tps: {ae_title: TPS, port: 104}\n",
    "bad-regex": "routes:\n  - name: r\n    match: {institution: '[queen'}\n",
    "tls-file-missing": "dicom:\n  tls: {certificate: gone.pem, private_key: node.key}\n",
}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real program in a child process, as a user runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VCEMRI_")}
    return subprocess.run(
        [sys.executable, "-m", "vcemri", *args],
        capture_output=True, text=True, timeout=120, env={**clean, **(env or {})},
    )


pytestmark = pytest.mark.usefixtures("no_vcemri_environment")


def test_help_lists_only_commands_that_work():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert sorted(commands) == ["config", "demo", "evaluate", "jobs", "process", "recalibrate",
                                "refit-confidence", "serve", "simulate", "status", "study", "train",
                                "version", "worker"]
    done = run("--help")
    assert done.returncode == 0
    listed = done.stdout.split("positional arguments")[1].split("options")[0]
    for command in commands:
        assert command in listed
    assert "not a medical device" in " ".join(done.stdout.split())


def test_every_listed_command_runs(tmp_path):
    for argv in (["version"], ["version", "--short"], ["config", "check"],
                 ["config", "reference"]):
        assert cli.main(argv) == 0, argv


def test_version(capsys):
    assert cli.main(["version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"vcemri {__version__}"
    assert any(line.startswith("pydicom ") for line in out)
    assert any(line.startswith("torch ") for line in out)


def test_console_script_is_installed():
    # `pip install .` puts the `vcemri` console script next to the interpreter.
    script = Path(sys.executable).parent / "vcemri"
    if not script.exists():
        unavailable("the package is not installed in this interpreter's environment "
                    "(pip install -e .)")  # skips, or fails in CI
    done = subprocess.run([str(script), "version", "--short"], capture_output=True, text=True)
    assert done.stdout.strip() == f"vcemri {__version__}"


def test_config_check_default_prints_the_effective_configuration():
    done = run("config", "check", str(Path(__file__).parents[1] / "config" / "default.yaml"))
    assert done.returncode == 0, done.stderr
    assert "dicom:\n  ae_title: VCEMRI\n" in done.stdout
    assert "configuration OK" in done.stderr


def test_config_check_shows_environment_overrides(tmp_path):
    done = run("config", "check", env={"VCEMRI_DICOM__PORT": "2104"})
    assert done.returncode == 0, done.stderr
    assert "port: 2104" in done.stdout
    assert "overridden from the environment: VCEMRI_DICOM__PORT" in done.stdout


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_config_check_broken_file_one_line_exit_2(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(BROKEN_CONFIGS[name])
    (tmp_path / "node.key").write_text("key")

    done = run("config", "check", str(path))

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"vcemri: error: {path}: ")
    assert "Traceback" not in done.stderr


def test_config_check_messages_are_precise(tmp_path):
    expected = {
        "bad-port": "dicom.port: 70000 is not a valid TCP port (1-65535) [line 2]",
        "unknown-key": "storage.rot: unknown key (did you mean 'root'? allowed: audit_log, "
                       "min_free_mib, retention_days, retention_free_mib, root) [line 2]",
        "missing-destination-host": "destinations.tps.host: required setting is missing [line 2]",
        "bad-regex": "routes[0].match.institution: '[queen' is not a valid regular expression "
                     "(unterminated character set at position 0) [line 3]",
        "tls-file-missing": f"dicom.tls.certificate: file '{tmp_path.resolve()}/gone.pem' does "
                            "not exist [line 2]",
    }
    (tmp_path / "node.key").write_text("key")
    for name, message in expected.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(BROKEN_CONFIGS[name])
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert caught.value.problems == [message]


def test_config_check_uses_the_global_config_option(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("dicom: {port: 4104}\n")
    done = run("--config", str(path), "config", "check")
    assert done.returncode == 0
    assert "port: 4104" in done.stdout


def test_missing_config_file(tmp_path):
    done = run("config", "check", str(tmp_path / "absent.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"vcemri: error: {tmp_path / 'absent.yaml'}: file does not exist"


def test_usage_errors_exit_2():
    assert run("no-such-command").returncode == 2
    assert run().returncode == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [(InputError("T2w series not received within 600 s"), 1),
     (ModelError("checkpoint is corrupted"), 1),
     (StorageError("disk full"), 1),
     (PeerError("TPS refused the association"), 1),
     (ConfigError("x.yaml", ["a: bad"]), 2)],
)
def test_project_errors_print_their_reason(monkeypatch, capsys, error, code):
    monkeypatch.setattr(cli, "_version", lambda args: (_ for _ in ()).throw(error))
    assert cli.main(["version"]) == code
    err = capsys.readouterr().err
    assert err == f"vcemri: error: {error}\n"
    assert isinstance(error, VcemriError)


def test_bugs_are_one_line_unless_debug(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_version", broken)
    assert cli.main(["version"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error: ZeroDivisionError: division by zero" in err
    assert "--debug" in err

    assert cli.main(["--debug", "version"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err


def test_error_hint_is_shown():
    assert str(StorageError("disk full", hint="free space under /srv")) == (
        "disk full (free space under /srv)"
    )


@pytest.mark.parametrize("command", [("config", "check"), ("version",)])
def test_a_reader_that_goes_away_is_not_an_internal_error(command):
    # `vcemri config check | head -1`: the pipe is closed before the program writes.
    read, write = os.pipe()
    os.close(read)
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VCEMRI_")}
    try:
        done = subprocess.run([sys.executable, "-m", "vcemri", *command], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=clean)
    finally:
        os.close(write)
    assert done.returncode == cli.EXIT_BROKEN_PIPE
    assert done.stderr == ""
