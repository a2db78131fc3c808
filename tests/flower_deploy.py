"""Flower's real Deployment Engine on 127.0.0.1, for the tests and the overhead benchmark: a SuperLink with TLS and
SuperNode authentication, SuperNodes with registered keys, `flwr run`. Certificates and keys are made here with
`cryptography`; every component gets its own FLWR_HOME; update checks, telemetry and runtime dependency
installation are off; every process started is stopped by PID, its children included (recorded while it runs,
since Flower's `flower-superexec` children outlive their parents for a while).
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
UNREGISTERED_EXIT_CODE = 305  # logged by a SuperNode whose key the SuperLink does not know (its process returns 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def flwr_bin() -> str:
    return _bin("flwr")


def _write(path: str, data: bytes, mode: int = 0o644) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    return path


def make_tls(directory: str) -> dict:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it: {ca, cert, key} paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peft_lalora test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(os.path.join(directory, "ca.crt"), ca.public_bytes(pem)),
        "cert": _write(os.path.join(directory, "server.pem"), cert.public_bytes(pem)),
        "key": _write(
            os.path.join(directory, "server.key"),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            0o600,
        ),
    }


def make_node_key(directory: str, name: str) -> tuple[str, str]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (
        _write(os.path.join(directory, name), private, 0o600),
        _write(os.path.join(directory, name + ".pub"), public + b"\n"),
    )


def _adopt_orphans(enable: bool) -> None:
    """Linux: make this process the subreaper of its descendants, so that a child of a stopped component is
    re-parented to us (and reaped here) rather than left to PID 1 as a zombie."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, int(enable), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap(pids, timeout: float = 10.0) -> None:
    """Collect the exit status of descendants re-parented to us (no zombie left behind)."""
    deadline = time.time() + timeout
    for pid in pids:
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] != 0 or time.time() > deadline:
                    break
            except ChildProcessError:  # not (or no longer) our child: its own parent reaps it
                break
            time.sleep(0.05)


def _is_flower(process: psutil.Process) -> bool:
    try:
        return process.name().startswith(("flower", "flwr"))
    except psutil.NoSuchProcess:
        return False


def _signal_and_wait(processes: list, sig, timeout: float) -> None:
    running = []
    for process in processes:
        try:
            if process.is_running():
                process.send_signal(sig)
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(running, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class Deployment:
    """The processes of one test: start them, run jobs, stop them all (`close`)."""

    def __init__(self, root: str, *, pythonpath: str = ROOT + os.pathsep + os.path.join(ROOT, "tests")):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.tls = make_tls(root)
        self.home = os.path.join(root, "flwr_home")
        os.makedirs(self.home, exist_ok=True)
        self.env = dict(os.environ, **QUIET, PYTHONPATH=pythonpath, FLWR_HOME=self.home)
        _adopt_orphans(True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.family: dict[str, dict[int, psutil.Process]] = {}  # name -> every descendant seen
        self.left: list[psutil.Process] = []  # descendants of a killed process (`kill`), stopped by `close`
        self.port = None

    # ----- processes ----------------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list, env: dict) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "ab")  # a restarted component appends to its log
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        self.procs[name] = proc
        self.family[name] = {}
        return proc

    def record_children(self) -> None:
        """Remember every descendant of our processes now (they may outlive or be re-parented from them)."""
        for name, proc in self.procs.items():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.family[name].setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as handle:
            return handle.read()

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop `name` and every descendant recorded for it, by PID: `sig` to all of them at once (the process
        first), then SIGKILL to whatever outlives `timeout`."""
        self.record_children()
        proc = self.procs.pop(name)
        family = sorted(self.family.pop(name).values(), key=lambda p: p.pid)
        _signal_and_wait(([psutil.Process(proc.pid)] if proc.poll() is None else []) + family, sig, timeout)
        proc.wait(timeout=10)
        _reap(p.pid for p in family)

    def kill(self, name: str) -> None:
        """SIGKILL `name` alone, by PID, and reap it: a crash. Its descendants are left running, to find out on
        their own, as after a real `kill -9`; they stay recorded, and `close` stops whichever still runs."""
        self.record_children()
        proc = self.procs.pop(name)
        self.left.extend(self.family.pop(name).values())
        proc.kill()
        proc.wait(timeout=30)

    def wait_left(self, timeout: float) -> list:
        """Reap the descendants left by `kill` as they exit, as init would (Flower's children poll their parent's
        PID with `kill(pid, 0)`, which a zombie passes), until none runs or `timeout`: those still running."""
        deadline = time.time() + timeout
        while True:
            running = []
            for process in self.left:
                try:
                    if not process.is_running():
                        continue
                    if process.status() == psutil.STATUS_ZOMBIE:
                        os.waitpid(process.pid, os.WNOHANG)
                        continue
                    running.append(process)
                except (psutil.NoSuchProcess, ChildProcessError):  # gone, or a zombie its own parent reaps
                    pass
            if not running or time.time() > deadline:
                return running
            time.sleep(0.2)

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)
        left, self.left = sorted(self.left, key=lambda p: p.pid), []
        _signal_and_wait(left, signal.SIGTERM, 20.0)
        _reap(p.pid for p in left)
        # Flower processes re-parented to us after their parent exited on its own (never recorded): stop, reap
        orphans = [p for p in psutil.Process().children() if _is_flower(p)]
        _signal_and_wait(orphans, signal.SIGTERM, 20.0)
        _reap(p.pid for p in orphans)
        _adopt_orphans(False)

    # ----- components -----------------------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0, *, database: str | None = None, port: int | None = None) -> None:
        """Start the SuperLink on `port` (default: a free one); with `database` (a file), its state persists across
        a restart on that file (Flower's default keeps it in memory)."""
        self.port = port or free_port()
        self._start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--ssl-ca-certfile",
                self.tls["ca"],
                "--ssl-certfile",
                self.tls["cert"],
                "--ssl-keyfile",
                self.tls["key"],
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--database", database] if database else []),
            ],
            self.env,
        )
        context = ssl.create_default_context(cafile=self.tls["ca"])
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=context, timeout=2):
                    break
            except OSError:
                if time.time() > deadline or self.procs["superlink"].poll() is not None:
                    raise RuntimeError(
                        "the SuperLink did not become healthy:\n" + self.log("superlink")[-3000:]
                    ) from None
                time.sleep(0.5)
        with open(os.path.join(self.home, "config.toml"), "w") as handle:
            handle.write(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
                f'root-certificates = "{self.tls["ca"]}"\n'
            )

    def flwr(self, *args, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def register(self, public_key: str) -> None:
        out = self.flwr("supernode", "register", public_key, "local")
        if out.returncode != 0:
            raise RuntimeError(f"`flwr supernode register` failed:\n{out.stdout}\n{out.stderr}")

    def start_supernode(self, name: str, private_key: str, node_config: dict) -> subprocess.Popen:
        home = os.path.join(self.root, f"home_{name}")
        os.makedirs(home, exist_ok=True)
        config = " ".join(
            f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in node_config.items()
        )
        return self._start(
            name,
            [
                _bin("flower-supernode"),
                "--root-certificates",
                self.tls["ca"],
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--auth-supernode-private-key",
                private_key,
                "--node-config",
                config,
            ],
            dict(self.env, FLWR_HOME=home),
        )

    def run(self, app_dir: str, run_config: dict, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """`flwr run APP local --stream -c ...`: returns when the run has finished."""
        overrides = " ".join(
            f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in run_config.items()
        )
        args = ["run", app_dir, "local", "--stream"] + (["--run-config", overrides] if overrides else [])
        return self.flwr(*args, timeout=timeout)


TOY_APP = '''"""A Flower app around the tests' tiny RoBERTa (every host imports tests/fed_helpers.py)."""

from datasets import load_from_disk
from fed_helpers import toy_model
from transformers import default_data_collator

from peft_lalora.flower import FlowerTask, make_client_app, make_server_app

TASK = FlowerTask(build_model=lambda rc, nc: toy_model(rc["method"]),
                  load_client_data=lambda nc, rc: (load_from_disk(nc["data-path"]), default_data_collator),
                  config_keys=("method",))
server_app = make_server_app(TASK)
client_app = make_client_app(TASK)
'''


def write_toy_app(directory: str, run_config: dict) -> str:
    """An app folder (pyproject.toml + package) whose `[tool.flwr.app.config]` is `run_config`."""
    os.makedirs(os.path.join(directory, "toyapp"), exist_ok=True)
    lines = [
        f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
        for k, v in run_config.items()
    ]
    with open(os.path.join(directory, "pyproject.toml"), "w") as handle:
        handle.write(
            '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
            '[project]\nname = "lalora-toy"\nversion = "0.1.0"\n\n[tool.flwr.app]\npublisher = "peft-lalora"\n\n'
            '[tool.flwr.app.components]\nserverapp = "toyapp.apps:server_app"\n'
            'clientapp = "toyapp.apps:client_app"\n\n[tool.flwr.app.config]\n' + "\n".join(lines) + "\n"
        )
    with open(os.path.join(directory, "toyapp", "__init__.py"), "w") as handle:
        handle.write("")
    with open(os.path.join(directory, "toyapp", "apps.py"), "w") as handle:
        handle.write(TOY_APP)
    return directory
