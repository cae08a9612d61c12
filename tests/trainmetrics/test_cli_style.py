"""One CLI style for every subcommand: --help explains every option and says each default once; bad input is
one line on stderr naming the flag as typed, exit code 2; a server says where it listens."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from trainmetrics.cli import COMMANDS, build_parser


def helps() -> dict[str, str]:
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices    # the subcommands' parsers
    return {name: sub.format_help() for name, sub in actions.items()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_explains_every_option_and_says_each_default_once(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    text = helps()[command]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help text"
    entries = re.split(r"\n  (?=-)", text)
    for entry in entries:
        flat = " ".join(entry.split())
        assert flat.count("(default") <= 1, f"{command}: default said twice: {flat}"
        assert "(default: )" not in flat and "(default: None)" not in flat, f"{command}: empty default: {flat}"
        assert "(default: True)" not in flat and "(default: False)" not in flat, f"{command}: {flat}"
    for action in parser._actions:
        # A number says its default, 0 included (0 == False once hid it).
        if type(action.default) in (int, float) and action.option_strings:
            flat = " ".join(next(e for e in entries if action.option_strings[0] in e.split()[0]).split())
            assert "default" in flat, f"{command} {action.option_strings[0]}: no default shown: {flat}"


# `trainmetrics train` with torch unimportable: a bad flag is said before torch's import (1.5 s of imports
# here, for a typo; the flags were checked after it).
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from trainmetrics.cli import main; sys.exit(main())"


def one_line_error(args: list[str], mentions: str, timeout: float = 120) -> None:
    command = ["-c", WITHOUT_TORCH] if args[0] == "train" else ["-m", "trainmetrics"]
    result = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=timeout)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (args, result.stderr[-1500:])
    assert len(lines) == 1 and mentions in lines[0], (args, result.stderr)
    # One style, whoever found the problem (argparse or a check): the command's own prefix, nothing appended.
    assert lines[0].startswith(f"trainmetrics {args[0]}: error: "), lines[0]
    assert not lines[0].endswith("(see --help)"), lines[0]


BAD = [
    (["analytics", "--lookback", "forever"], "--lookback"),
    (["analytics", "--prometheus-timeout", "20"], "--prometheus-timeout"),
    (["analytics", "--request-timeout", "nan"], "--request-timeout"),     # was blamed on --prometheus-timeout
    (["analytics", "--request-timeout", "inf"], "--request-timeout"),
    (["analytics", "--listen", "nowhere:99999"], "--listen"),
    (["analytics", "--cache-entries", "-1"], "--cache-entries"),
    (["analytics", "--max-answer-bytes", "0"], "--max-answer-bytes"),
    (["analytics", "--prometheus-url", "ftp://x"], "--prometheus-url"),
    # Only the scheme was checked: these started a server whose every request failed, or (the IPv6 host) whose start
    # ended in a traceback and exit code 3.
    (["analytics", "--prometheus-url", "http://[::1"], "--prometheus-url: must be an http(s) URL"),
    (["analytics", "--prometheus-url", "http://"], "--prometheus-url: must be an http(s) URL"),
    (["analytics", "--prometheus-url", "http://prometheus:99999"], "--prometheus-url: must be an http(s) URL"),
    (["server", "--data-dir", "/tmp/x", "--advertise-url", "http://", "--listen", "127.0.0.1:0"], "--advertise-url"),
    (["train", "--register-url", "http://:8000"], "--register-url"),
    (["analytics", "--prometheus-bearer-token-file", "/nonexistent"], "--prometheus-bearer-token-file: '/nonexist"),
    (["analytics", "--prometheus-bearer-token-file", "/proc/self/status"], "holds characters no token has"),
    (["analytics", "--prometheus-ca-file", "/proc/self/status"], "--prometheus-ca-file: '/proc/self/status' holds no"),
    (["analytics", "--prometheus-header", "X-Scope-OrgID"], "--prometheus-header: 'X-Scope-OrgID' is not"),
    (["analytics", "--prometheus-header", "Authorization: Bearer x"], "--prometheus-bearer-token-file"),
    (["server", "--data-dir", "/proc/forbidden", "--listen", "127.0.0.1:0"], "--data-dir"),
    (["server", "--data-dir", "/proc/self/status", "--listen", "127.0.0.1:0"],
     "--data-dir: '/proc/self/status' is not a directory"),
    (["server", "--data-dir", "/tmp/x", "--max-concurrent", "0", "--listen", "127.0.0.1:0"], "--max-concurrent"),
    # A name whose bytes are not UTF-8 (here \xff): SQLite refuses to keep it, and every upload answered 500.
    (["server", "--data-dir", "/tmp/x-\udcff", "--listen", "127.0.0.1:0"],
     "--data-dir: '/tmp/x-\\udcff' is not UTF-8"),
    (["server", "--data-dir", "/tmp/x", "--job-dir", "/tmp/j-\udcff", "--listen", "127.0.0.1:0"],
     "--job-dir: '/tmp/j-\\udcff' is not UTF-8"),
    (["server", "--data-dir", "/tmp/x", "--listen", "0.0.0.0:0"], "--listen"),
    # Passed on to every job, whose trainer refused them: the server started and every job failed as bad input.
    (["server", "--data-dir", "/tmp/x", "--linger-timeout", "nan", "--listen", "127.0.0.1:0"], "--linger-timeout"),
    (["server", "--data-dir", "/tmp/x", "--linger-timeout", "inf", "--listen", "127.0.0.1:0"], "--linger-timeout"),
    (["server", "--data-dir", "/tmp/x", "--job-dir", "/proc/self/status", "--listen", "127.0.0.1:0"],
     "--job-dir: '/proc/self/status' is not a directory"),
    # The same: a job dir it cannot write in (made by `sudo install -d`, /var/lib/trainmetrics not there for a user).
    (["server", "--data-dir", "/tmp/x", "--job-dir", "/sys/nope", "--listen", "127.0.0.1:0"],
     "--job-dir: '/sys/nope': cannot write in '/sys'"),
    (["train", "--epochs", "0"], "--epochs"),
    # The demo started the whole stack, then died in a traceback on the job server's 400.
    (["demo", "--epochs", "-1"], "--epochs"),
    # The same past the spec's upper bound: only a lower one was checked before the stack started.
    (["demo", "--epochs", "99999999999"], "--epochs: must be at most 2147483647, got 99999999999"),
    (["demo", "--batch-size", "2147483648"], "--batch-size: must be at most 2147483647, got 2147483648"),
    (["demo", "--model", "resnet"], "--model"),
    (["demo", "--prometheus-port", "70000"], "--prometheus-port"),
    (["demo", "--workdir", "/proc/self/status"], "--workdir: '/proc/self/status' is not a directory"),
    (["demo", "--workdir", "/sys"], "--workdir: '/sys': cannot write in '/sys'"),      # was a traceback
    (["demo", "--workdir", "/sys/new/dir"], "--workdir: '/sys/new/dir': cannot write in '/sys'"),
    (["train", "--lr", "-1"], "--lr"),
    # Unwritable, it was found out when a hang's stacks were to be written there, and they were lost.
    (["train", "--diagnostics-dir", "/sys/nope"], "--diagnostics-dir: '/sys/nope': cannot write in '/sys'"),
    (["train", "--device", "tpu"], "--device"),
    (["train", "--epochs", "three"], "--epochs"),
    (["exporter", "--sample-interval", "0"], "--sample-interval"),
    (["exporter", "--listen", "127.0.0.1:99999"], "--listen"),
    # An IPv6 address without brackets: `::1` was host ':' port 1 ("cannot listen on ::1: Name or service not known";
    # a job found it after loading its data), `::1:9400` (an address itself) was [::1]:9400.
    *[([command, *(["--data-dir", "/tmp/x"] if command == "server" else []), "--listen", address],
       "--listen: invalid listen address") for command in ("exporter", "analytics", "server")
      for address in ("::1", "::1:9400")],
    (["analytics", "--listen", "::1"], "an IPv6 address goes in brackets: write [::1]:PORT"),
    (["train", "--metrics-listen", "::1"], "--metrics-listen: invalid listen address '::1': an IPv6 address goes in "
                                           "brackets: write [::1]:PORT"),
    (["exporter", "--job-dir", "/sys/nope"], "--job-dir: '/sys/nope' cannot be created: "),   # was "not readable"
    (["exporter", "--web.config.file", "/nonexistent.yml"], "--web.config.file: "),
    (["train", "--web.config.file", "/nonexistent.yml"], "--web.config.file: "),
    (["analytics", "--web.config.file", "/nonexistent.yml"], "--web.config.file: "),
    (["server", "--data-dir", "/tmp/x", "--web.config.file", "/nonexistent.yml"], "--web.config.file: "),
    *[([command, *(["--data-dir", "/tmp/x"] if command == "server" else []), "--nproc", "2"],
       "unrecognized arguments: --nproc 2") for command in COMMANDS],
    # An empty path (an unset variable: --data-dir "$DATA") was the current directory: a server put its database,
    # datasets and jobs there, an exporter watched it for job files.
    (["server", "--data-dir", ""], "--data-dir: empty"),
    (["server", "--data-dir", "/tmp/x", "--job-dir", ""], "--job-dir: empty"),
    (["server", "--data-dir", "/tmp/x", "--tokens", ""], "--tokens: empty"),
    (["exporter", "--job-dir", ""], "--job-dir: empty"),
    (["exporter", "--path.rootfs", ""], "--path.rootfs: empty"),
    (["train", "--checkpoint-dir", ""], "--checkpoint-dir: empty"),
    (["train", "--diagnostics-dir", ""], "--diagnostics-dir: empty"),
    (["demo", "--workdir", ""], "--workdir: empty"),
]

TOP_LEVEL_BAD = [(["--bogus"], "unrecognized arguments: --bogus"), (["--bogus", "train"], "--bogus"),
                 (["bogus"], "invalid choice: 'bogus'")]


@pytest.mark.parametrize("args,mention", TOP_LEVEL_BAD, ids=[" ".join(args) for args, _ in TOP_LEVEL_BAD])
def test_a_bad_top_level_argument_is_one_line_naming_it(args, mention):
    """`trainmetrics --bogus` said only that a command is required."""
    result = subprocess.run([sys.executable, "-m", "trainmetrics", *args], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("trainmetrics: error: ")
    assert mention in lines[0], lines


def test_version_says_the_installed_packages_version():
    """`trainmetrics --version` was refused as an option before the command ("options go after the command"), and
    no command had one either."""
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "trainmetrics", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"trainmetrics {version('trainmetrics')}"), result


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(args) for args, _ in BAD])
def test_bad_input_is_one_line_naming_the_flag(args, flag):
    one_line_error(args, flag)


@pytest.mark.parametrize("args,said", [
    (["analytics", "--prometheus-bearer-token-file", "{fifo}"], "--prometheus-bearer-token-file: '{fifo}': not a "
                                                                "regular file"),
    (["analytics", "--prometheus-ca-file", "{fifo}"], "--prometheus-ca-file: '{fifo}': not a regular file"),
    (["exporter", "--web.config.file", "{fifo}"], "--web.config.file: web config {fifo}: not a regular file"),
    (["exporter", "--web.config.file", "/dev/zero"], "--web.config.file: web config /dev/zero: not a regular file"),
    (["exporter", "--web.config.file", "{fifo_cert}"], "tls_server_config.cert_file: {fifo}: not a regular file"),
], ids=["token file", "CA file", "web config", "web config /dev/zero", "web config's certificate"])
def test_a_file_named_by_a_flag_that_is_no_regular_file_is_one_line_not_a_wait(args, said, tmp_path):
    """Each was opened as any file: a FIFO at the path held the command's start until something wrote to it (the
    CA file and the certificate: OpenSSL's open), and /dev/zero as the web config was read without end."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_cert = tmp_path / "web.yml"
    fifo_cert.write_text(f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n")
    one_line_error([arg.format(fifo=fifo, fifo_cert=fifo_cert) for arg in args], said.format(fifo=fifo), timeout=60)


@pytest.mark.parametrize("args,said", [
    (["analytics", "--lookback", "-1d"], "--lookback: expected a duration like 30m, 24h or 7d (1ms to 90d), "
                                         "got '-1d'"),
    (["train", "--lr", "-1e-3"], "--lr: must be above 0, got -0.001"),
])
def test_a_value_starting_with_a_minus_is_the_flags_value(args, said):
    """argparse took `-1d` and `-1e-3` for flags of their own ("argument --lookback: expected one argument"):
    only `-1` and `-0.5` were values. No flag of ours starts with a digit."""
    one_line_error(args, said)


@pytest.mark.parametrize("command", ["analytics", "server", "exporter"])
def test_a_port_in_use_is_one_line_naming_the_flag(command, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--data-dir", str(tmp_path)] if command == "server" else []
        one_line_error([command, "--listen", f"127.0.0.1:{port}", *extra], "--listen")


@contextlib.contextmanager
def listening(command: str, data_dir: Path, address: str = "127.0.0.1:0", **popen):
    """Start a server command on a free port; yield (its process, the line saying where it listens) once it
    listens; killed at the end if it still runs."""
    extra = {"server": ["--data-dir", str(data_dir)], "exporter": ["--no-collector.gpu"]}.get(command, [])
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", command, "--listen", address, *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "listening on" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "exited without saying where it listens"
        yield process, line
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize("command", ["analytics", "server", "exporter"])
def test_a_server_says_where_it_listens(command, tmp_path):
    with listening(command, tmp_path) as (process, line):
        assert re.search(rf"^trainmetrics {command}: listening on https?://127\.0\.0\.1:\d+", line), line
        assert not line.rstrip().endswith(":0")
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0


@pytest.mark.parametrize("command", ["analytics", "server", "exporter"])
def test_a_server_on_ipv6_says_a_url_that_reaches_it(command, tmp_path):
    """The line said http://::1:34951, which no client parses."""
    with listening(command, tmp_path, "[::1]:0") as (process, line):
        url = re.search(r"listening on (\S+)", line).group(1)
        assert re.fullmatch(r"http://\[::1\]:\d+(/metrics)?", url), line
        assert httpx.get(url.removesuffix("/metrics") + ("/metrics" if command == "exporter" else "/healthz"),
                         timeout=10).status_code in (200, 503)


@pytest.mark.parametrize("flags,flag", [
    (["--prometheus-url", "notaurl"], "--prometheus-url"), (["--advertise-url", "x"], "--advertise-url"),
    (["--ray-python", "/usr/bin/python3"], "--ray-python"), (["--listen", "PORT_IN_USE"], "--listen")])
def test_a_refused_server_leaves_no_data_dir(flags, flag, tmp_path):
    """A bad --prometheus-url or a port in use was refused after the data dir and its server.lock were made."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = f"127.0.0.1:{taken.getsockname()[1]}"
        flags = [in_use if value == "PORT_IN_USE" else value for value in flags]
        listen = [] if "--listen" in flags else ["--listen", "127.0.0.1:0"]
        one_line_error(["server", "--data-dir", str(tmp_path / "data"), *listen, *flags], flag)
    assert not (tmp_path / "data").exists()


def _lock_is_a_directory(data: Path) -> None:
    (data / "server.lock").mkdir()


def _database_is_not_one(data: Path) -> None:
    (data / "trainmetrics.db").write_text("not a database, whatever its name says\n" * 100)


def _datasets_is_a_file(data: Path) -> None:
    (data / "datasets").write_text("")


def _jobs_is_a_file(data: Path) -> None:
    (data / "jobs").write_text("")


def _jobs_table_is_a_view(data: Path) -> None:      # a schema that cannot take the columns added since
    import sqlite3

    database = sqlite3.connect(data / "trainmetrics.db")
    database.execute("CREATE VIEW jobs AS SELECT 1 AS id")
    database.commit()
    database.close()


@pytest.mark.parametrize("damage,mention", [
    (_lock_is_a_directory, "server.lock: Is a directory"), (_database_is_not_one, "trainmetrics.db: cannot be used"),
    (_datasets_is_a_file, "datasets: not a directory"), (_jobs_is_a_file, "jobs: not a directory"),
    (_jobs_table_is_a_view, "trainmetrics.db: cannot be used")])
def test_a_data_dir_the_server_cannot_use_is_one_line_naming_it(damage, mention, tmp_path):
    """A lock file it could not open, a database that is none or a file where its datasets go ended the start in
    a traceback; a file where its jobs go started a server that failed every job it started."""
    damage(tmp_path)
    one_line_error(["server", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"], f"--data-dir: {tmp_path}/")
    one_line_error(["server", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"], mention)


@pytest.mark.parametrize("args,mention", [
    (["--targets-dir", "SAME", "--job-dir", "SAME"], "--job-dir: 'SAME' is also --targets-dir"),
    (["--result-file", "/sys/result.json"], "--result-file: '/sys/result.json': cannot write in '/sys'")])
def test_train_output_paths_that_cannot_work_are_refused_up_front(args, mention, tmp_path):
    """One directory for both was refused as a second process of the job (the process's own claim, taken twice);
    a result file it could not write trained the job to its end and exited 0 without it."""
    same = str(tmp_path / "same")
    one_line_error(["train", "--epochs", "1", *[same if arg == "SAME" else arg for arg in args]],
                   mention.replace("SAME", same))


def test_under_nohup_a_closed_terminal_stops_no_server(tmp_path):
    """SIGHUP's handler undid `nohup`: the exporter it was meant to keep running stopped."""
    with listening("exporter", tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as \
            (process, _):
        process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert process.poll() is None
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0


@pytest.mark.parametrize("command", ["analytics", "server", "exporter"])
def test_a_closed_terminal_stops_a_server_cleanly(command, tmp_path):
    """SIGHUP killed it at once (exit 129): the server's running jobs went on unsupervised, never paused."""
    with listening(command, tmp_path) as (process, _):
        process.send_signal(signal.SIGHUP)
        process.wait(timeout=60)
    assert process.returncode == 0


def test_a_database_another_process_holds_locked_is_one_line_naming_it(tmp_path):
    """A server started while another process held the database's write lock (a backup, the sqlite3 shell) ran
    until its first write: a traceback where it had jobs to recover, every request failing where it had none."""
    import sqlite3

    from trainmetrics.jobserver.store import JobStore

    JobStore(tmp_path / "trainmetrics.db").close()
    holder = sqlite3.connect(tmp_path / "trainmetrics.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        one_line_error(["server", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
                       "trainmetrics.db: cannot be used as the job server's database (database is locked)")
    finally:
        holder.close()


# A Ctrl-C while `trainmetrics` builds its parser, which imports every command's module (most of a start-up), or
# while the analytics check their flags, before they take the stop signals themselves. Python's own SIGINT handler
# set first: a test run started in the background by a shell without job control (`pytest ... &`) has SIGINT
# ignored, which its children inherit, and Python then keeps (the Ctrl-C lost, the server started).
INTERRUPTED_AT_START = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                        "import trainmetrics.demo as demo, trainmetrics.analytics.cli as analytics\n"
                        "interrupt = lambda *args: signal.raise_signal(signal.SIGINT)\n"
                        "setattr(demo if sys.argv[1] == 'parser' else analytics, sys.argv[2], interrupt)\n"
                        "from trainmetrics.cli import main; sys.exit(main(sys.argv[3:]))")


@pytest.mark.parametrize("moment,patched,command,code", [
    ("parser", "configure", "analytics", 0), ("parser", "configure", "exporter", 0),
    ("parser", "configure", "train", 3), ("flags", "web_config_flag", "analytics", 0)])
def test_a_ctrl_c_at_the_start_ends_cleanly(moment, patched, command, code):
    """It ended in a traceback of whatever import it cut, the process dying of the signal; a Ctrl-C a moment
    later, before the server took the stop signals, exited 130, which no command's exit codes have."""
    flags = ["--epochs", "1"] if command == "train" else ["--listen", "127.0.0.1:0"]
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_AT_START, moment, patched, command, *flags],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.returncode == code, result.stderr[-1500:]
