"""The embedded offline LLM: SmolLM2-135M-Instruct served by llama-cpp-python's OpenAI-compatible server.

`LocalLLMServer` starts the server as a child process on loopback, waits until it answers, and stops it on exit.
Running this module (`python -m guardloop.trainer.variations.llm_server ...`) is the child: it takes
llama_cpp.server's own flags, plus two of ours, and runs that server.

Why a child entry point of our own instead of `python -m llama_cpp.server`:
- llama.cpp's extra CPU buffer types (AMX tiles, weight repacking) crash with SIGSEGV on the first decode on VMs
  whose CPU advertises AMX without the hypervisor enabling it (measured here on Firecracker). The child turns them
  off unless asked (`--guardloop-cpu-repack`); a 135M model does not need them.
- The child watches its parent and exits when the parent is gone, so even a SIGKILLed trainer leaves no orphan.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ALIAS = "smollm2-135m-instruct"
_CPU_REPACK_FLAG = "--guardloop-cpu-repack"
_PARENT_PID_FLAG = "--guardloop-parent-pid"


class LLMServerError(Exception):
    """The embedded LLM server could not be started (one readable line, then the server's own last words)."""


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalLLMServer:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, started on enter and stopped on exit.

    >>> with LocalLLMServer() as server:
    ...     client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        model_alias: str = EMBEDDED_MODEL_ALIAS,
        threads: int = 1,
        n_ctx: int = 2048,
        start_timeout: float = 60.0,
        cpu_repack: bool = False,
        seed: int | None = None,
    ) -> None:
        self._model_path = model_path
        self.model = model_alias
        self.threads = threads
        self.n_ctx = n_ctx
        self.start_timeout = start_timeout
        self.cpu_repack = cpu_repack
        self.seed = seed
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LLMServerError("the embedded LLM server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __enter__(self) -> LocalLLMServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _command(self, model_path: Path, port: int) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "guardloop.trainer.variations.llm_server",
            "--model",
            str(model_path),
            "--model_alias",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--n_ctx",
            str(self.n_ctx),
            "--verbose",
            "False",
            _PARENT_PID_FLAG,
            str(os.getpid()),
        ]
        if self.seed is not None:
            command += ["--seed", str(self.seed)]
        if self.cpu_repack:
            command.append(_CPU_REPACK_FLAG)
        return command

    def start(self) -> None:
        if self._process is not None:
            raise LLMServerError("the embedded LLM server is already running")
        from guardloop.trainer.base_models import smollm2_gguf

        model_path = self._model_path or smollm2_gguf()
        port = _free_loopback_port()
        # A file, not a pipe: nobody drains a pipe while the server runs, and a full pipe would block it.
        # An unnamed one: nothing is left behind in /tmp, even when this process is killed.
        self._log_file = tempfile.TemporaryFile(prefix="guardloop-llm-")  # noqa: SIM115
        started = time.monotonic()
        self._process = subprocess.Popen(
            self._command(model_path, port),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.port = port
        try:
            self._wait_until_ready(started)
        except BaseException:
            self.stop(report_exit=False)  # the error raised says it already
            raise
        log.info(
            "embedded LLM %s serving on %s (pid %d, %d thread(s), ready in %.1fs)",
            self.model,
            self.base_url,
            self._process.pid,
            self.threads,
            time.monotonic() - started,
        )

    def _wait_until_ready(self, started: float) -> None:
        assert self._process is not None
        deadline = started + self.start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                tail = self.output_tail()
                last_words = tail.splitlines()[-1].strip() if tail.strip() else "no output"
                raise LLMServerError(
                    f"the embedded LLM server exited with code {code} while starting ({last_words}); "
                    f"its last output:\n{tail}"
                )
            try:
                response = httpx.get(f"{self.base_url}/models", timeout=1.0)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise LLMServerError(
                    f"the embedded LLM server did not answer on {self.base_url} within {self.start_timeout:.0f}s; "
                    f"its last output:\n{self.output_tail()}"
                )
            time.sleep(0.1)

    def output_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote (stdout and stderr together)."""
        if self._log_file is None:
            return ""
        # pread: the child shares this file's offset; moving it would make the child overwrite its own output.
        fd = self._log_file.fileno()
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0, *, report_exit: bool = True) -> None:
        """Terminate, wait `grace` seconds, then kill. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is not None:
            if report_exit:
                log.warning("embedded LLM server had exited with code %s:\n%s", process.returncode, self.output_tail(5))
        elif process is not None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("embedded LLM server (pid %d) ignored SIGTERM for %.0fs; killing it", process.pid, grace)
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.port = None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


# ------------------------------------------------------------------------------------------ the child process
def _disable_cpu_extra_buffers() -> None:
    """Load models without llama.cpp's extra CPU buffer types (AMX / repacked weights); see the module docstring."""
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params
    if not any(name == "use_extra_bufts" for name, *_ in bindings.llama_model_params._fields_):
        return  # a llama.cpp without the switch: nothing to turn off

    def params_without_extra_buffers() -> bindings.llama_model_params:
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = params_without_extra_buffers


def _exit_when_orphaned(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)  # the parent is gone: nobody will stop us, and nobody needs us

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cpu_repack = _CPU_REPACK_FLAG in args
    if cpu_repack:
        args.remove(_CPU_REPACK_FLAG)
    if _PARENT_PID_FLAG in args:
        at = args.index(_PARENT_PID_FLAG)
        _exit_when_orphaned(int(args[at + 1]))
        del args[at : at + 2]
    if not cpu_repack:
        _disable_cpu_extra_buffers()
    from llama_cpp.server.__main__ import main as llama_server_main

    sys.argv = [sys.argv[0], *args]
    llama_server_main()


if __name__ == "__main__":
    main()
