"""``deeptarget models fetch`` and ``models list`` against a real aiohttp mirror on loopback, serving files the tests
make (no shared assets, no network): a good file is fetched, verified, renamed into place and then used by the
embedder; a wrong digest, a truncated download, a 404, a mirror that hangs, a server sending more than the registry's
size and a redirect to another host each give a one-line error naming the file and leave nothing where the code
looks; an interrupted download resumes with a Range request, and one from a server that ignores Range starts over."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision
from aiohttp import web

from deeptarget.cli.models import model_rows
from deeptarget.core.errors import ModelFetchError
from deeptarget.core.settings import Settings
from deeptarget.models.embedder import BACKBONES, Embedder
from deeptarget.models.fetch import Fetched, Fetcher, FetchOptions, staging_file
from deeptarget.models.files import FACE_FILE, MODEL_FILES, ModelFile, cache_path

ROOT = Path(__file__).resolve().parents[1]
YUNET = MODEL_FILES[FACE_FILE]


@dataclass
class Mirror:
    """A loopback mirror: ``files`` by name, each served as ``modes[name]`` says; every request is logged."""

    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    log: list[dict[str, object]] = field(default_factory=list)
    cut_at: int = 0  # "truncate" and "hang" send this many bytes of the body
    released: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        mode = self.modes.get(name, "ok")
        entry: dict[str, object] = {"name": name, "range": request.headers.get("Range"), "sent": 0}
        self.log.append(entry)
        if mode == "redirect":
            raise web.HTTPFound(self.url.replace("127.0.0.1", "localhost") + name)
        if name not in self.files:
            entry["status"] = 404
            raise web.HTTPNotFound()
        body = self.files[name]
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes=") and mode != "ignore_range":
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
        if mode == "more":
            body = body + b"x" * 4096
        response = web.StreamResponse(status=206 if start else 200)
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        response.content_length = len(body) - start
        entry["status"] = response.status
        await response.prepare(request)
        if mode in ("truncate", "hang"):
            await response.write(body[start : self.cut_at])
            entry["sent"] = self.cut_at - start
            if mode == "hang":
                await asyncio.wait_for(self.released.wait(), 30)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(body[start:])
        entry["sent"] = len(body) - start
        await response.write_eof()
        return response


@pytest.fixture
async def mirror() -> AsyncIterator[Mirror]:
    served = Mirror()
    app = web.Application()
    app.router.add_get("/{name}", served.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    served.url = f"http://127.0.0.1:{port}/"
    yield served
    served.released.set()
    await runner.cleanup()


def entry_for(name: str, data: bytes, *, digest: str | None = None) -> ModelFile:
    """A registry entry for ``data`` served under ``name`` (its digest unless told otherwise)."""
    return ModelFile(
        name=name,
        url=f"https://example.invalid/{name}",
        file_name=name,
        cache="deeptarget",
        sha256=digest or hashlib.sha256(data).hexdigest(),
        min_size=len(data),
        max_size=len(data),
        digest_source="made by the test",
    )


def fetcher(tmp_path: Path, mirror: Mirror, **options: object) -> Fetcher:
    return Fetcher(tmp_path / "files", FetchOptions(mirror=mirror.url, **options))


async def fetch_one(tmp_path: Path, mirror: Mirror, entry: ModelFile, **options: object) -> Fetched:
    done, failed = await fetcher(tmp_path, mirror, **options).fetch_all([entry])
    if failed:
        raise failed[0]
    return done[0]


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torchvision's cache, for this test only (TORCH_HOME is how torch.hub is told where it is)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real torchvision MobileNetV2 state dict (random weights): what the embedder loads as 'imagenet'."""
    path = tmp_path_factory.mktemp("weights") / "mnv2.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path.read_bytes()


def noise(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7919 + seed * 31 + (i >> 8)) % 251 for i in range(n))


def nothing_where_the_code_looks(fetch: Fetcher, entry: ModelFile) -> bool:
    return not fetch.destination(entry).exists()


async def test_a_good_file_is_fetched_verified_renamed_into_place_and_used_by_auto(
    tmp_path: Path, mirror: Mirror, torch_home: Path, mobilenet_file: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    name = MODEL_FILES["mobilenet_v2"].file_name  # the name torchvision looks for
    entry = ModelFile("mobilenet_v2", MODEL_FILES["mobilenet_v2"].url, name, "torchvision",
                      hashlib.sha256(mobilenet_file).hexdigest(), len(mobilenet_file), len(mobilenet_file),
                      digest_source="made by the test")  # fmt: skip
    mirror.files[name] = mobilenet_file
    done = await fetch_one(tmp_path, mirror, entry)
    assert done.path == torch_home / name == cache_path(entry)
    assert done.path.read_bytes() == mobilenet_file and done.check.ok and done.check.status == "verified (sha256)"
    assert not staging_file(done.path).parent.exists()  # nothing left staged
    assert "fetched from http://127.0.0.1" in done.shown and "verified (sha256)" in done.shown

    registry = {**MODEL_FILES, "mobilenet_v2": entry}
    used = Embedder("mobilenet_v2", weights="auto", image_size=64, device="cpu", files=registry)
    assert ":imagenet:" in used.model_id and used.spec.weights == "imagenet"
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(done.path, weights_only=True))
    assert torch.equal(used.model.features[0][0].weight.cpu(), reference.features[0][0].weight)

    # The same file under the project's registry fails torchvision's prefix check (b0353104): not used, warned about.
    with caplog.at_level(logging.WARNING):
        fallback = Embedder("mobilenet_v2", weights="auto", image_size=64, device="cpu")
    assert ":random0:" in fallback.model_id
    assert "fails verification" in caplog.text and "deeptarget models fetch mobilenet_v2" in caplog.text

    again = await fetch_one(tmp_path, mirror, entry)
    assert again.action == "already there" and len(mirror.log) == 1  # a verified file is not fetched twice


async def test_a_wrong_digest_is_an_error_and_leaves_no_file(tmp_path: Path, mirror: Mirror) -> None:
    data = noise(50_000)
    entry = entry_for("model.bin", data, digest=hashlib.sha256(b"another file").hexdigest())
    mirror.files["model.bin"] = data
    fetch = fetcher(tmp_path, mirror)
    done, failed = await fetch.fetch_all([entry])
    assert not done and len(failed) == 1
    message = str(failed[0])
    assert message.startswith("model.bin (model.bin): wrong file, NOT used: sha256 ") and "\n" not in message
    assert hashlib.sha256(data).hexdigest() in message and "deleted" in message
    assert nothing_where_the_code_looks(fetch, entry)
    assert not staging_file(fetch.destination(entry)).exists()


async def test_a_truncated_download_is_an_error_and_resumes_with_a_range_request(
    tmp_path: Path, mirror: Mirror
) -> None:
    data = noise(300_000, seed=1)
    entry = entry_for("weights.pth", data)
    mirror.files["weights.pth"] = data
    mirror.modes["weights.pth"] = "truncate"
    mirror.cut_at = 120_000
    fetch = fetcher(tmp_path, mirror)
    with pytest.raises(ModelFetchError, match=r"^weights\.pth \(weights\.pth\): download cut short at 120,000 of"):
        await fetch_one(tmp_path, mirror, entry)
    assert nothing_where_the_code_looks(fetch, entry)
    part = staging_file(fetch.destination(entry))
    assert part.read_bytes() == data[:120_000]  # kept, for the resume

    mirror.modes["weights.pth"] = "ok"
    done = await fetch_one(tmp_path, mirror, entry)
    assert mirror.log[-1] == {"name": "weights.pth", "range": "bytes=120000-", "sent": 180_000, "status": 206}
    assert done.resumed_at == 120_000 and done.path.read_bytes() == data and done.check.ok
    assert "resumed at byte 120,000" in done.shown and not part.exists()


async def test_a_server_that_ignores_range_is_read_from_the_start(tmp_path: Path, mirror: Mirror) -> None:
    data = noise(200_000, seed=2)
    entry = entry_for("weights.pth", data)
    mirror.files["weights.pth"] = data
    mirror.modes["weights.pth"] = "truncate"
    mirror.cut_at = 50_000
    with pytest.raises(ModelFetchError, match="cut short"):
        await fetch_one(tmp_path, mirror, entry)
    mirror.modes["weights.pth"] = "ignore_range"
    done = await fetch_one(tmp_path, mirror, entry)
    assert mirror.log[-1] == {"name": "weights.pth", "range": "bytes=50000-", "sent": 200_000, "status": 200}
    assert done.path.read_bytes() == data and done.check.ok  # not the first 50 kB twice


async def test_a_missing_file_is_a_404_error(tmp_path: Path, mirror: Mirror) -> None:
    entry = entry_for("absent.onnx", noise(1000))
    fetch = fetcher(tmp_path, mirror)
    with pytest.raises(ModelFetchError, match=r"^absent\.onnx \(absent\.onnx\): not found \(HTTP 404\) at http://"):
        await fetch_one(tmp_path, mirror, entry)
    assert nothing_where_the_code_looks(fetch, entry)
    assert not staging_file(fetch.destination(entry)).parent.exists()


async def test_a_mirror_that_hangs_times_out_with_a_clear_error(tmp_path: Path, mirror: Mirror) -> None:
    data = noise(100_000, seed=3)
    entry = entry_for("slow.pth", data)
    mirror.files["slow.pth"] = data
    mirror.modes["slow.pth"] = "hang"
    mirror.cut_at = 10_000
    fetch = fetcher(tmp_path, mirror, read_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ModelFetchError, match=r"^slow\.pth \(slow\.pth\): no data for 0\.3 s from .* \(read timeout\)"):
        await fetch_one(tmp_path, mirror, entry, read_timeout_s=0.3)
    assert loop.time() - started < 5
    assert nothing_where_the_code_looks(fetch, entry)


async def test_a_server_sending_more_than_the_registry_size_is_refused(tmp_path: Path, mirror: Mirror) -> None:
    data = noise(20_000, seed=4)
    entry = entry_for("big.pth", data)
    mirror.files["big.pth"] = data
    mirror.modes["big.pth"] = "more"
    fetch = fetcher(tmp_path, mirror)
    with pytest.raises(ModelFetchError, match=r"announces 24,096 bytes, more than the 20,000 expected"):
        await fetch_one(tmp_path, mirror, entry)
    assert nothing_where_the_code_looks(fetch, entry)


async def test_a_redirect_to_another_host_is_refused(tmp_path: Path, mirror: Mirror) -> None:
    entry = entry_for("moved.pth", noise(1000))
    mirror.modes["moved.pth"] = "redirect"
    with pytest.raises(ModelFetchError, match=r"refusing localhost: only 127\.0\.0\.1 may be contacted"):
        await fetch_one(tmp_path, mirror, entry)
    assert [entry["name"] for entry in mirror.log] == ["moved.pth"]  # localhost was never asked


async def test_a_mirror_folder_is_copied_and_verified_the_same_way(tmp_path: Path) -> None:
    good, bad = noise(40_000, seed=5), noise(40_000, seed=6)
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "good.pth").write_bytes(good)
    (folder / "bad.pth").write_bytes(bad)
    entries = [entry_for("good.pth", good), entry_for("bad.pth", good), entry_for("gone.pth", good)]
    fetch = Fetcher(tmp_path / "files", FetchOptions(mirror=str(folder)))
    done, failed = await fetch.fetch_all(entries)
    assert [(d.entry.name, d.action, d.check.ok) for d in done] == [("good.pth", "copied", True)]
    assert done[0].path.read_bytes() == good
    assert [str(err).split(":")[0] for err in failed] == ["bad.pth (bad.pth)", "gone.pth (gone.pth)"]
    assert "wrong file" in str(failed[0]) and "not in the mirror folder" in str(failed[1])
    assert nothing_where_the_code_looks(fetch, entries[1]) and nothing_where_the_code_looks(fetch, entries[2])


async def test_models_list_reports_present_verified_absent_and_the_auto_choice(
    tmp_path: Path, mirror: Mirror, torch_home: Path, mobilenet_file: bytes
) -> None:
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    yunet_bytes = noise(5000, seed=7)
    mnv2 = ModelFile("mobilenet_v2", MODEL_FILES["mobilenet_v2"].url, MODEL_FILES["mobilenet_v2"].file_name,
                     "torchvision", hashlib.sha256(mobilenet_file).hexdigest()[:8],
                     len(mobilenet_file) - 10, len(mobilenet_file) + 10, digest_source="test")  # fmt: skip
    yunet = ModelFile(FACE_FILE, YUNET.url, YUNET.file_name, "deeptarget", hashlib.sha256(yunet_bytes).hexdigest(),
                      5000, 5000, digest_source="test")  # fmt: skip
    registry = {**MODEL_FILES, "mobilenet_v2": mnv2, FACE_FILE: yunet}

    before = model_rows(settings, registry)
    assert {row["name"]: row["status"] for row in before["models"]} == dict.fromkeys(registry, "absent")
    assert {row["name"] for row in before["models"] if row["needed"]} == {"mobilenet_v2", FACE_FILE}
    assert before["auto"]["weights"] == "none" and before["auto"]["face_detector"] == "haar"
    assert "deeptarget models fetch mobilenet_v2" in before["auto"]["weights_problem"]

    mirror.files[mnv2.file_name] = mobilenet_file
    mirror.files[YUNET.file_name] = yunet_bytes
    done, failed = await Fetcher(settings.model_files_dir, FetchOptions(mirror=mirror.url)).fetch_all(
        [registry["mobilenet_v2"], registry[FACE_FILE]]
    )
    assert not failed and [d.check.ok for d in done] == [True, True]
    assert "prefix-verified (sha256 " in done[0].shown and "torchvision's own check" in done[0].shown
    (torch_home / MODEL_FILES["resnet50"].file_name).write_bytes(b"not resnet50")  # present, but wrong

    after = model_rows(settings, registry)
    rows = {row["name"]: row for row in after["models"]}
    assert rows["mobilenet_v2"]["verified"] and rows["mobilenet_v2"]["check"] == "sha256-prefix"
    assert rows["mobilenet_v2"]["status"] == f"prefix-verified (sha256 {mnv2.sha256}…, torchvision's own check)"
    assert rows[FACE_FILE]["status"] == "verified (sha256)"
    assert rows[FACE_FILE]["path"] == str(tmp_path / "data" / "models" / "files" / YUNET.file_name)
    assert rows["resnet50"]["present"] and not rows["resnet50"]["verified"]
    assert rows["resnet50"]["status"].startswith("FAILED verification (12 bytes, expected 102530333)")
    assert rows["efficientnet_b0"]["status"] == "absent"
    auto = after["auto"]
    assert auto["weights"] == "imagenet" and auto["weights_file"] == str(torch_home / mnv2.file_name)
    assert auto["face_detector"] == "yunet" and auto["face_model_file"] == rows[FACE_FILE]["path"]

    resnet = model_rows(Settings(data_dir=tmp_path / "data", device="cpu", backbone="resnet50"), registry)["auto"]
    assert resnet["weights"] == "none" and "fails verification" in resnet["weights_problem"]


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """``python -m deeptarget ...`` in a child process while this loop keeps serving the mirror."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deeptarget", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(child.communicate(), 50)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


@pytest.mark.timeout(120)
async def test_the_cli_refuses_a_mirrored_file_with_the_wrong_digest_and_lists_the_auto_choice(
    tmp_path: Path, mirror: Mirror
) -> None:
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "DEEPTARGET_DATA_DIR": str(tmp_path / "data")}
    mirror.files[YUNET.file_name] = noise(YUNET.min_size, seed=8)  # the right size, not YuNet
    code, out, err = await run_cli("models", "fetch", "yunet", "--mirror", mirror.url, "--read-timeout", "5", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == ""
    assert lines == [lines[0]] and lines[0].startswith(
        "deeptarget: models fetch: yunet (face_detection_yunet_2023mar.onnx): wrong file, NOT used: sha256 "
    )
    assert f"expected {YUNET.sha256}" in lines[0]
    assert not (tmp_path / "data" / "models" / "files" / YUNET.file_name).exists()
    assert mirror.log == [{"name": YUNET.file_name, "range": None, "sent": YUNET.min_size, "status": 200}]

    code, out, err = await run_cli("models", "list", "--json", env=env)
    assert code == 0, err
    report = json.loads(out)
    assert {row["name"]: (row["present"], row["verified"]) for row in report["models"]} == dict.fromkeys(
        MODEL_FILES, (False, False)
    )
    assert report["auto"]["weights"] == "none"
    expected_detector = "mtcnn" if report["auto"]["device"].startswith("cuda") else "haar"
    assert report["auto"]["face_detector"] in (expected_detector, "haar")


def test_the_registry_names_torchvision_s_own_files_and_urls() -> None:
    for name, backbone in BACKBONES.items():
        entry = MODEL_FILES[name]
        url: str = backbone.weights_enum.url
        assert entry.url == url and entry.file_name == url.rsplit("/", 1)[-1] and entry.cache == "torchvision"
        prefix = entry.file_name.rsplit("-", 1)[-1].removesuffix(".pth")
        assert entry.sha256.startswith(prefix)  # torch.hub's check_hash: the name's hex is the digest's prefix
        mib: float = backbone.weights_enum.meta["_file_size"]
        assert entry.min_size <= mib * 2**20 + 2**20 / 1000 and entry.max_size >= mib * 2**20 - 2**20 / 1000
    assert not MODEL_FILES["mobilenet_v2"].full_digest and MODEL_FILES["resnet50"].full_digest
    assert YUNET.full_digest and YUNET.exact_size == 232_589 and YUNET.cache == "deeptarget"
    with pytest.raises(ValueError, match="hex"):
        ModelFile("x", "https://h/x", "x", "deeptarget", "XYZ", 1, 1, digest_source="")
