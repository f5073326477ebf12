"""`framepack serve` as a process: the `/generate` API through gradio_client, loopback binding,
basic auth, and no file outside the outputs folder reachable over HTTP."""

from __future__ import annotations

import http.client
import urllib.parse

import psutil
import pytest
from gradio_client import Client, handle_file
from gui_server import Server, write_start_image

from framepack.cli.main import main
from framepack.cli.serve import parse_auth
from framepack.io import read_video
from framepack.testing import tiny_bundle_dir

WS = 9
USER, PASSWORD = "ada", "s3cret:with:colons"
# /generate's parameters after the start image: end image, prompt, negative prompt, seconds, seed,
# steps, distilled guidance, CFG, window, order, resolution, crf, GIF.
ONE_SECTION = dict(seconds=1.2, seed="5", steps=2, resolution=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "auth.txt").write_text(f"# who may use it\n{USER}:{PASSWORD}\n")
    srv = Server(tiny_bundle_dir(), root / "outputs", "--auth", str(root / "auth.txt"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    return write_start_image(tmp_path_factory.mktemp("img") / "start.png")


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, auth=(USER, PASSWORD), verbose=False, download_files=str(server.outputs.parent))


def test_generate_endpoint_with_gradio_client(client, server, image_file):
    job_id, video, info = client.predict(
        handle_file(image_file), None, "a cat walks", **ONE_SECTION, gif=True, api_name="/generate"
    )
    assert info["state"] == "done" and info["seed"] == 5 and info["job"] == job_id
    frames, fps, meta = read_video(video)  # the file the client downloaded through the server
    assert frames.shape[0] == info["frames"] == 4 * (WS + 1) - 3 and fps == 30
    assert (server.outputs / info["video"]).is_file() and (server.outputs / info["gif"]).is_file()
    assert '"seed": 5' in meta["framepack"]
    # A random seed comes back, so the video can be made again.
    _, _, again = client.predict(
        handle_file(image_file), None, "a dog", **{**ONE_SECTION, "seed": "random"}, api_name="/generate"
    )
    assert isinstance(again["seed"], int) and again["seed"] != 5


def test_generate_endpoint_runs_the_modes(client, server, image_file):
    _, frame, info = client.predict(
        handle_file(image_file), None, "a cat", **ONE_SECTION, one_frame=True, api_name="/generate"
    )
    assert info["state"] == "done" and info["video"] is None and frame.endswith(".png")
    assert (server.outputs / info["image"]).is_file() and (server.outputs / info["sidecar"]).is_file()
    _, video, info = client.predict(None, None, "a red ball", **ONE_SECTION, loop=True, api_name="/generate")
    assert info["state"] == "done" and read_video(video)[0].shape[0] == 4 * (WS + 1) - 3  # text-to-video


def test_generate_bad_input_is_one_sentence_and_the_server_goes_on(client, server, image_file):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^Job #\d+ failed: .*ends at 0.5 s, not after its start at 1 s\.$"):
        client.predict(handle_file(image_file), None, "[1s-0.5s: a cat]", **ONE_SECTION, api_name="/generate")
    with pytest.raises(AppError, match="seed must be a whole number or 'random'"):
        client.predict(
            handle_file(image_file), None, "a cat", **{**ONE_SECTION, "seed": "x"}, api_name="/generate"
        )
    not_an_image = server.outputs.parent / "notes.png"
    not_an_image.write_text("a text file named like an image")
    with pytest.raises(
        AppError, match=r"^The start image: notes.png is not an image file that can be read\.$"
    ):
        client.predict(handle_file(str(not_an_image)), None, "a cat", **ONE_SECTION, api_name="/generate")
    _, _, info = client.predict(handle_file(image_file), None, "a cat", **ONE_SECTION, api_name="/generate")
    assert info["state"] == "done"
    with pytest.raises(AppError, match="nothing to cancel"):
        client.predict(info["job"], api_name="/cancel")


def _get(server, path: str, cookie: str | None = None) -> int:
    """GET the path exactly as written (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    status = conn.getresponse().status
    conn.close()
    return status


def _login(server) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = urllib.parse.urlencode({"username": USER, "password": PASSWORD})
    conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    assert response.status == 200
    cookies = [v.split(";")[0] for k, v in response.getheaders() if k.lower() == "set-cookie"]
    conn.close()
    return "; ".join(cookies)


def test_only_the_outputs_folder_is_served(client, server, image_file):
    _, _, info = client.predict(handle_file(image_file), None, "a cat", **ONE_SECTION, api_name="/generate")
    inside = f"{server.outputs}/{info['sidecar']}"
    assert _get(server, "/gradio_api/file=" + inside) == 401  # nothing without logging in
    cookie = _login(server)
    assert _get(server, "/gradio_api/file=" + inside, cookie) == 200
    bundle_file = tiny_bundle_dir() / "framepack.json"
    for path in (
        f"{server.outputs}/../{server.log.name}",
        f"{server.outputs}/%2e%2e/{server.log.name}",
        f"{server.outputs}/..%2f{server.log.name}",
        f"{server.outputs}/inputs/../../{server.log.name}",
        str(bundle_file),
        "/etc/passwd",
        "../../../../etc/passwd",
        "pyproject.toml",
    ):
        assert _get(server, "/gradio_api/file=" + path, cookie) in (403, 404), path
        assert _get(server, "/file=" + path, cookie) in (403, 404), path


def test_binds_to_loopback_only(server):
    addresses = {c.laddr.ip for c in psutil.Process(server.proc.pid).net_connections("inet")}
    assert addresses and addresses <= {"127.0.0.1"}, addresses


def test_auth_parsing(tmp_path):
    assert parse_auth("a:b:c") == [("a", "b:c")] and parse_auth(None) is None
    path = tmp_path / "auth"
    path.write_text("x:1\n\n# comment\ny:2\n")
    assert parse_auth(str(path)) == [("x", "1"), ("y", "2")]
    for bad in ("nouser", ":pw", "user:"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--port", "70000"], "--port must be from 1 to 65535"),
        (["--auth", "nopassword"], "--auth must hold USER:PASSWORD"),
        (["--model", "/does/not/exist"], "does/not/exist"),
        (["--loras", "/no/such/folder"], "--loras /no/such/folder is not a folder."),
    ],
)
def test_serve_bad_input_is_one_sentence(argv, needle, capsys, tmp_path):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_bundle_dir())]
    assert main(["serve", "--host", "0.0.0.0", "--outputs", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    if "--model" in argv and "does/not/exist" in argv:
        assert "warning: listening on 0.0.0.0" in err  # another host is warned about first
