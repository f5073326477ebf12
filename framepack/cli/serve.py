"""`framepack serve`: the web GUI, on loopback unless told otherwise."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from ..devices import resolve_device
from .common import UserError, add_device_argument, add_model_argument, cli_model
from .generate_options import ATTENTION_CHOICES
from .interrupts import stop_if_interrupted

__all__ = ["add_parser", "check_port", "parse_auth", "LOOPBACK"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the web GUI: a job queue, live previews, the video as it grows")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--outputs", default="outputs", help="folder for videos (the only one served)")
    p.add_argument(
        "--loras", metavar="DIR", help="a folder of LoRAs (.safetensors files, PEFT folders) to pick from"
    )
    p.add_argument("--auth", help="USER:PASSWORD, or a file with one USER:PASSWORD per line")
    add_device_argument(p)
    p.add_argument(
        "--vram-budget",
        metavar="GB|auto",
        help="device memory for all weights: they load onto the host, and it is the budget of jobs "
        "that give none ('none' in the form: everything on the device)",
    )
    p.add_argument(
        "--ram-budget",
        metavar="GB|auto",
        help="host memory for weights: a bundle larger than this is read from its files as jobs run "
        "(on a CPU it bounds all weights)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's blocks for every job (the first job pays the compile)",
    )
    p.add_argument(
        "--fp8-compute",
        action="store_true",
        help="every job's transformer blocks multiply in fp8 (e4m3); an NVIDIA GPU of compute capability 8.9+",
    )
    p.add_argument(
        "--attention",
        choices=list(ATTENTION_CHOICES),
        default="sdpa",
        help="every job's attention kernel: sdpa (default), sage (8-bit), flash or xformers (an NVIDIA "
        "GPU and the package)",
    )
    p.set_defaults(func=cmd_serve)


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`USER:PASSWORD` or a file of such lines (blank lines and # comments skipped); raises ValueError."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"the --auth file {path} cannot be read ({e}).") from None
        where = f"the --auth file {path}"
    else:
        lines, where = [value], "--auth"
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where} must hold USER:PASSWORD (or name a file of such lines).")
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f"{where} holds no USER:PASSWORD line.")
    return pairs


def check_port(host: str, port: int) -> None:
    """UserError (one sentence naming the port and `--port`) unless this process can listen on
    `host:port` now; the probe socket is closed again at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        if os.name != "nt":  # as the server sets it: a port in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(_port_taken(host, port)) from None
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port."
            ) from None


def _port_taken(host: str, port: int) -> str:
    return f"port {port} on {host} is in use by another program; choose a free one with --port."


def cmd_serve(args: argparse.Namespace) -> None:
    from ..memory.budgets import parse_budget
    from ..model.attention import check_backend
    from ..pipeline.fp8_compute import check_fp8_compute

    args.model = cli_model(args.model)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {args.port}.")
    try:
        auth = parse_auth(args.auth)
        device = resolve_device(args.device)
        check_fp8_compute(args.fp8_compute, device)
        check_backend(args.attention, device)
        parse_budget(args.vram_budget)
        parse_budget(args.ram_budget, "RAM")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.host not in LOOPBACK:
        print(
            f"framepack: warning: listening on {args.host}, so anyone who can reach this machine can use "
            f"the GUI and its device{'' if auth else ' (no --auth given)'}.",
            file=sys.stderr,
        )
    if args.loras and not Path(args.loras).is_dir():
        raise UserError(f"--loras {args.loras} is not a folder.")
    check_port(args.host, args.port)  # before the long load
    outputs = Path(args.outputs).resolve()
    try:
        outputs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"the outputs folder {outputs} cannot be created ({e.strerror}).") from None

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local GUI phones nobody
    import diffusers.utils.logging
    import transformers.utils.logging

    from ..gui.app import build_app, launch
    from ..gui.jobs import JobQueue
    from ..pipeline.bundle import load_bundle

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        bundle = load_bundle(
            args.model, device=device, vram_budget=args.vram_budget, ram_budget=args.ram_budget
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    stop_if_interrupted()  # a Ctrl-C that the loaders swallowed
    queue = JobQueue(
        bundle,
        outputs,
        vram_budget=args.vram_budget,
        ram_budget=args.ram_budget,
        compile=args.compile,
        fp8_compute=args.fp8_compute,
        attention=args.attention,
    )
    app = build_app(queue, outputs, loras_dir=args.loras)
    try:
        launch(app, outputs, host=args.host, port=args.port, auth=auth)
    except OSError:  # taken since the check: Gradio's own advice names its environment, not --port
        raise UserError(_port_taken(args.host, args.port)) from None
    finally:
        queue.close(timeout=5)
