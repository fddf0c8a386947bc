"""A real ComfyUI server in a subprocess, driven over its HTTP API.

Stdlib only (urllib, subprocess), so any Python can drive it: the server itself
runs under ComfyUI's Python (config.venv_python()). Everything the server reads
or writes lives under one base directory (--base-directory), which keeps the
ComfyUI tree pristine and lets our pack be linked in as a custom node.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from . import config


class ComfyError(RuntimeError):
    """The server refused or failed a prompt; .payload holds ComfyUI's JSON."""

    def __init__(self, message, payload=None, log_tail=""):
        super().__init__(message + (f"\n--- server log (tail) ---\n{log_tail}" if log_tail else ""))
        self.payload = payload or {}


class PromptValidationError(ComfyError):
    """HTTP 400 from POST /prompt: the graph did not validate (nothing ran)."""

    @property
    def error(self) -> dict:
        return self.payload.get("error", {})

    @property
    def node_errors(self) -> dict:
        """{node_id: {"errors": [{"type", "message", "details", ...}], "class_type": ...}}"""
        return self.payload.get("node_errors", {})


class ServerDied(ComfyError):
    pass


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted" | "timeout"
    outputs: dict = field(default_factory=dict)  # {node_id: {"images": [...], ...}}
    messages: list = field(default_factory=list)  # [[event, data], ...] from the history
    seconds: float = 0.0  # queue → history entry, wall clock
    history: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error(self) -> dict | None:
        """The execution_error data: node_id, node_type, exception_type, exception_message, traceback."""
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    @property
    def cached_nodes(self) -> list:
        for event, data in self.messages:
            if event == "execution_cached":
                return list(data.get("nodes", []))
        return []

    def error_text(self) -> str:
        e = self.error
        if not e:
            return f"prompt {self.prompt_id}: {self.status}"
        tb = "".join(e.get("traceback", []))
        return (f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                f"{e.get('exception_message')}\n{tb}")


def _die_with_parent():
    """Runs in the child before exec: SIGTERM it when the test process dies, even by SIGKILL,
    so a killed pytest leaves no 2 GB server spinning on the machine (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with `with ComfyServer() as srv:` or srv.start() / srv.stop()."""

    def __init__(self, base_dir=None, comfyui=None, python=None, port=None, pack_dir=None,
                 extra_args=(), env=None, startup_timeout=180, keep_base_dir=False, link_pack=True):
        self._own_base = base_dir is None
        self.base_dir = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="svdq-comfy-"))
        self.comfyui = pathlib.Path(comfyui or config.comfyui_path())
        self.python = pathlib.Path(python or config.venv_python())
        self.port = port
        self.pack_dir = pathlib.Path(pack_dir or config.REPO_ROOT)
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.keep_base_dir = keep_base_dir
        self.link_pack = link_pack  # False: custom_nodes/ is the caller's (e.g. an installed copy of the pack)
        self.client_id = uuid.uuid4().hex
        self.proc = None
        self.startup_seconds = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = None

    # -- layout ---------------------------------------------------------
    @property
    def models_dir(self) -> pathlib.Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> pathlib.Path:
        return self.base_dir / "output"

    @property
    def pack_link(self) -> pathlib.Path:
        return self.base_dir / "custom_nodes" / config.PACK_DIR_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_base(self):
        for sub in ("models", "custom_nodes", "input", "output", "user", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.pack_link
        if not self.link_pack:
            return
        if link.is_symlink() or link.exists():
            link.unlink()
        # Without a root __init__.py the repo is not (yet) a ComfyUI pack; linking
        # it would only add an IMPORT FAILED line to every log.
        if (self.pack_dir / "__init__.py").is_file():
            link.symlink_to(self.pack_dir, target_is_directory=True)

    # -- lifecycle ------------------------------------------------------
    def start(self):
        if self.proc is not None:
            return self
        if not (self.comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI main.py in {self.comfyui} "
                                    "(run scripts/setup_comfyui.sh or set COMFYUI_PATH)")
        self._prepare_base()
        self.port = self.port or _free_port()
        cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               # no on-disk DB to clean up or share between servers
               "--database-url", "sqlite:///:memory:",
               # our own /history polling would otherwise flood the log
               "--dont-print-server", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                self._log_file.close()
                self._log_file = None
                raise ServerDied(f"ComfyUI exited with rc {rc} during startup (log: {self.log_path})",
                                 log_tail=self.log_tail())
            try:
                self._request("GET", "/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"ComfyUI not ready after {self.startup_timeout} s\n{self.log_tail()}")
                time.sleep(0.25)
        self.startup_seconds = time.perf_counter() - t0
        return self

    def stop(self, timeout=20):
        if self.proc is not None:
            if self.proc.poll() is None:
                # The server runs in its own session: signal only that process group.
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout)
                except ProcessLookupError:
                    pass
            self.proc = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._own_base and not self.keep_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs -----------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines=80, width=400) -> str:
        # ComfyUI logs some single lines of 100 kB (the stub text encoders' "clip missing: [...]").
        cut = lambda s: s if len(s) <= width else s[:width] + f" ...[{len(s) - width} chars]"
        return "\n".join(cut(s) for s in self.log_text().splitlines()[-lines:])

    def pack_status(self) -> str:
        """'absent' (repo has no __init__.py), 'failed' (IMPORT FAILED / import traceback) or 'loaded'."""
        if not self.pack_link.is_symlink():
            return "absent"
        return "failed" if self.pack_import_error() else "loaded"

    def pack_import_error(self) -> str | None:
        """The log lines about our pack failing to import, or None."""
        log = self.log_text()
        name = re.escape(config.PACK_DIR_NAME)
        failed = re.search(rf"\(IMPORT FAILED\): .*{name}\s*$", log, re.M)
        cannot = re.search(rf"^.*Cannot import .*{name}.*$", log, re.M)
        if not (failed or cannot):
            return None
        # Include the traceback ComfyUI logs just before "Cannot import ...".
        if cannot:
            start = log.rfind("Traceback (most recent call last)", 0, cannot.start())
            return log[start if start >= 0 else cannot.start():cannot.end()]
        return failed.group(0)

    def peak_rss_mb(self) -> float | None:
        """Server's peak resident memory (VmHWM), Linux only."""
        try:
            status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
        except (OSError, AttributeError):
            return None
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(m.group(1)) / 1024 if m else None

    # -- HTTP -----------------------------------------------------------
    def _request(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def object_info(self, node_class=None) -> dict:
        return self._request("GET", "/object_info" + (f"/{node_class}" if node_class else ""), timeout=60)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt_id. Raises PromptValidationError on HTTP 400."""
        try:
            resp = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"message": raw.decode(errors="replace")}}
            if e.code == 400:
                err = payload.get("error", {})
                msg = err.get("message", err) if isinstance(err, dict) else err
                raise PromptValidationError(f"prompt rejected: {msg}; node_errors: "
                                            f"{json.dumps(payload.get('node_errors', {}))[:2000]}", payload) from None
            raise ComfyError(f"POST /prompt: HTTP {e.code}", payload, self.log_tail()) from None
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout=300, poll=0.1) -> PromptResult:
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            hist = self._request("GET", f"/history/{prompt_id}").get(prompt_id)
            if hist:  # an entry is written only once the prompt has finished
                break
            if not self.alive:
                raise ServerDied(f"ComfyUI died while running {prompt_id}", log_tail=self.log_tail())
            if time.monotonic() > deadline:
                return PromptResult(prompt_id, "timeout", seconds=time.perf_counter() - t0)
            time.sleep(poll)
        st = hist.get("status") or {}
        messages = st.get("messages", [])
        status = st.get("status_str", "error")
        if any(ev == "execution_interrupted" for ev, _ in messages):
            status = "interrupted"
        return PromptResult(prompt_id, status, hist.get("outputs", {}), messages,
                            time.perf_counter() - t0, hist)

    def run(self, prompt: dict, timeout=300) -> PromptResult:
        t0 = time.perf_counter()
        result = self.wait(self.queue(prompt), timeout)
        result.seconds = time.perf_counter() - t0
        return result

    def output_images(self, result: PromptResult) -> list:
        roots = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.base_dir / "input"}
        paths = []
        for node_out in result.outputs.values():
            for img in node_out.get("images", []):
                paths.append(roots[img.get("type", "output")] / img.get("subfolder", "") / img["filename"])
        return paths
