"""Fuzzing the readers of users' files other than scenes (hypothesis, derandomized): PLY Gaussians,
LoRA exports, images and videos given to prediction, generation and evaluation, depth/pose
predictions. Every case either reads cleanly (a harmless change) or ends in the project's own error
naming the file (FileFormatError / SceneFormatError, which also name the field, or generate's
ConfigError naming ``--input``), never a traceback from inside numpy, imageio, PIL, torch,
safetensors, plyfile or peft. VGGT and Wan checkpoints with wrong keys or shapes are pinned by
plain tests at the end.

Each case starts from one valid file written once per module and breaks it one or two ways.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fourdgen.backbones.wan import build_transformer
from fourdgen.data.scene import SceneFormatError
from fourdgen.errors import ConfigError, FileFormatError
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.ply import load_ply, save_ply
from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE, add_lora, load_lora, save_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure here reproduces
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )


def clear(e: Exception, path: Path) -> str:
    """The error is the project's, names the file (and a field): the event for hypothesis' stats."""
    assert isinstance(e, FileFormatError | ConfigError), f"{type(e).__name__}: {e}"
    assert str(path) in str(e), e
    if isinstance(e, FileFormatError):
        assert e.field, e
        return f"{type(e).__name__}: {re.sub(r'[0-9]+', 'N', e.field)}"
    return "ConfigError"


def _bytes(path: Path, how: str, n: int) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) * n // 100])
    elif how == "garbage":  # overwrite a stretch in the middle
        at = len(data) * n // 100
        path.write_bytes(data[:at] + bytes(range(256)) * 2 + data[at + 512 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not what you think")


BYTES = st.tuples(st.sampled_from(["truncate", "garbage", "empty", "text"]), st.integers(1, 99))


# --------------------------------------------------------------------------------------- PLY
N_GAUSS = 6


@pytest.fixture(scope="module")
def ply(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    gs = Gaussians(
        means=torch.randn(N_GAUSS, 3, generator=g),
        log_scales=torch.randn(N_GAUSS, 3, generator=g),
        quats=torch.randn(N_GAUSS, 4, generator=g),
        opacity_logits=torch.randn(N_GAUSS, generator=g),
        sh0=torch.randn(N_GAUSS, 1, 3, generator=g),
        shN=torch.randn(N_GAUSS, 3, 3, generator=g),  # SH degree 1
    )
    path = save_ply(tmp_path_factory.mktemp("ply") / "g.ply", gs)
    load_ply(path)
    return path


PROPS = ["x", "y", "z", "nx", "f_dc_0", "f_rest_0", "f_rest_8", "opacity", "scale_2", "rot_0", "rot_3"]


@st.composite
def ply_mutation(draw):
    kind = draw(st.sampled_from(["bytes", "count", "drop", "value", "ascii", "element", "list", "type"]))
    if kind == "bytes":
        return kind, draw(BYTES)
    if kind == "count":
        return kind, draw(st.integers(-N_GAUSS, 4).filter(bool))
    if kind == "value":
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e30]))
        return kind, (draw(st.sampled_from(PROPS)), draw(st.integers(0, N_GAUSS - 1)), value)
    return kind, draw(st.sampled_from(PROPS))


def _apply_ply(path: Path, mutation) -> None:
    from numpy.lib.recfunctions import repack_fields
    from plyfile import PlyData, PlyElement

    kind, arg = mutation
    if kind == "bytes":
        return _bytes(path, *arg)
    if kind == "count":  # the header's vertex count disagrees with the data
        data = path.read_bytes()
        m = re.search(rb"element vertex (\d+)", data)
        if m:
            n = max(0, int(m.group(1)) + arg)
            path.write_bytes(data[: m.start(1)] + str(n).encode() + data[m.end(1) :])
        return None
    try:
        v = PlyData.read(str(path), mmap=False)["vertex"].data  # a map would fault once rewritten
    except Exception:
        return None  # an earlier mutation broke the file: leave it broken
    names = list(v.dtype.names)
    if kind == "drop" and arg in names:
        names.remove(arg)
        v = repack_fields(v[names])
    elif kind == "value" and arg[0] in names and len(v) and v.dtype[arg[0]].kind == "f":
        v = v.copy()
        v[arg[0]][arg[1] % len(v)] = arg[2]
    elif kind == "type" and arg in names:  # an integer property where a float one should be
        v = np.array(v.tolist(), dtype=[(n, "i4" if n == arg else v.dtype[n]) for n in names])
    elif kind == "list" and arg in names:  # a list property of the same name
        dtype = [(n, "O" if n == arg else v.dtype[n]) for n in names]
        lv = np.empty(len(v), dtype=dtype)
        for n in names:
            lv[n] = [np.array([x], np.float32) for x in v[n]] if n == arg else v[n]
        v = lv
    el = PlyElement.describe(v, "gaussian" if kind == "element" else "vertex")
    PlyData([el], text=kind == "ascii").write(str(path))
    return None


@fuzz(120)
@given(mutations=st.lists(ply_mutation(), min_size=1, max_size=2))
def test_malformed_ply_gives_one_clear_error(ply, tmp_path_factory, mutations):
    path = tmp_path_factory.mktemp("case") / "g.ply"
    shutil.copy(ply, path)
    for m in mutations:
        _apply_ply(path, m)
    try:
        g = load_ply(path)
        for t in (g.means, g.log_scales, g.quats, g.opacity_logits, g.sh0, g.shN):
            assert torch.isfinite(t).all()  # what loads is usable
        event("read cleanly")
    except Exception as e:
        event(clear(e, path))


# ------------------------------------------------------------------------------- LoRA exports
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(the untouched tiny DiT, a rank-2 export of it with a domain-embedding extra)."""
    from fourdgen.nn.wan_fusion import install_width_fusion

    base = install_width_fusion(build_transformer(preset="tiny"))
    trained = add_lora(copy.deepcopy(base), rank=2, alpha=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n or "domain_embedding" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    out = save_lora(trained, tmp_path_factory.mktemp("lora") / "export")
    load_lora(copy.deepcopy(base), out)
    return base, out


@st.composite
def lora_mutation(draw):
    file = draw(st.sampled_from([LORA_FILE, LORA_FILE, EXTRA_FILE]))
    kind = draw(st.sampled_from(["bytes", "rename", "drop", "shape", "dtype", "value", "add"]))
    if kind == "bytes":
        return file, kind, draw(BYTES)
    return file, kind, (draw(st.integers(0, 40)), draw(st.integers(0, 5)))


def _apply_lora(folder: Path, mutation) -> None:
    file, kind, arg = mutation
    path = folder / file
    if kind == "bytes":
        return _bytes(path, *arg)
    try:
        sd = load_file(str(path))
    except Exception:
        return None
    if not sd:
        return None
    i, j = arg
    key = sorted(sd)[i % len(sd)]
    t = sd[key]
    if kind == "rename":
        new = [
            key.replace("blocks.0", "blocks.9"),  # a layer the DiT does not have
            key.replace("lora_A", "lora_C"),
            key.removeprefix("transformer."),
            key.replace(".weight", ".bias"),
            key + "_",
            key.replace("attn1", "attn2"),  # another real layer: the pair is then incomplete
        ][j]
        sd[new] = sd.pop(key)
    elif kind == "drop":
        sd.pop(key)
    elif kind == "shape":
        shape = list(t.shape)
        shape[j % len(shape)] += 1 if j < 3 else -1
        sd[key] = torch.zeros([max(s, 0) for s in shape])
    elif kind == "dtype":
        sd[key] = t.to([torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16, torch.uint8][j])
    elif kind == "value":
        t = t.clone()
        t.view(-1)[0] = [float("nan"), float("inf"), -float("inf"), 0.0, 1e4, -1e4][j]
        sd[key] = t
    elif kind == "add":
        sd[f"junk.{i}"] = torch.zeros(2)
    save_file(sd, str(path))
    return None


@fuzz(70)
@given(mutations=st.lists(lora_mutation(), min_size=1, max_size=2))
def test_malformed_lora_export_gives_one_clear_error(lora, tmp_path_factory, mutations):
    base, export = lora
    folder = tmp_path_factory.mktemp("case") / "export"
    shutil.copytree(export, folder)
    for m in mutations:
        _apply_lora(folder, m)
    model = copy.deepcopy(base)
    try:
        load_lora(model, folder)
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), n
        assert any("lora_A" in n for n, _ in model.named_parameters())
        event("read cleanly")
    except Exception as e:
        event(clear(e, folder))


def test_a_dlc_export_with_wrong_keys_or_shapes_is_refused(tmp_path):
    """One4D's two-branch export: each branch file is checked like a LoRA file, and against the
    installed DLC's rank, before anything is copied."""
    from fourdgen.nn.decoupled_lora import install_dlc, load_dlc, save_dlc

    def dlc(rank=2):
        return install_dlc(build_transformer(preset="tiny"), rank, rank, "blocks", (0,))

    out = save_dlc(dlc(), tmp_path / "dlc")
    load_dlc(dlc(), out)
    with pytest.raises(
        FileFormatError, match=r"rgb/pytorch_lora_weights\.safetensors: field .*lora_A.*rank 3"
    ):
        load_dlc(dlc(rank=3), out)
    f = out / "rgb" / LORA_FILE
    sd = load_file(str(f))
    key = next(k for k in sd if "lora_B" in k)
    save_file({**sd, key: sd[key][:, :1].contiguous()}, str(f))
    with pytest.raises(
        FileFormatError, match=rf"rgb/pytorch_lora_weights\.safetensors: field '{re.escape(key)}'"
    ):
        load_dlc(dlc(), out)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=r"field '<file>': expected a complete \.safetensors file"):
        load_dlc(dlc(), out)


# ----------------------------------------------------------------------- images for prediction
@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "in.png"
    iio.imwrite(path, np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    return path


IMAGE_EDITS = ["gray", "rgba", "gray16", "one_pixel", "jpeg", "palette", "two_channel"]


def _apply_image(path: Path, mutation) -> None:
    from PIL import Image

    kind, arg = mutation
    if kind == "bytes":
        return _bytes(path, *arg)
    try:
        img = np.asarray(Image.open(path).convert("RGB"))
    except Exception:
        return None
    if arg == "gray":
        iio.imwrite(path, img[..., 0], format="png")
    elif arg == "rgba":
        iio.imwrite(path, np.concatenate([img, img[..., :1]], -1), format="png")
    elif arg == "gray16":
        iio.imwrite(path, img[..., 0].astype(np.uint16) * 257, format="png")
    elif arg == "one_pixel":
        iio.imwrite(path, img[:1, :1], format="png")
    elif arg == "jpeg":  # a JPEG behind a .png name
        iio.imwrite(path, img, format="jpeg")
    elif arg == "palette":
        Image.fromarray(img).convert("P").save(path, format="png")
    elif arg == "two_channel":  # gray + alpha
        Image.fromarray(img[..., 0]).convert("LA").save(path, format="png")
    return None


IMAGE_MUTATION = st.one_of(
    st.tuples(st.just("bytes"), BYTES), st.tuples(st.just("edit"), st.sampled_from(IMAGE_EDITS))
)


@fuzz(60)
@given(mutations=st.lists(IMAGE_MUTATION, min_size=1, max_size=2))
def test_malformed_input_images_give_one_clear_error(image, tmp_path_factory, mutations):
    from fourdgen.data.images import load_image
    from fourdgen.evaluation.predictions import read_frames as eval_frames
    from fourdgen.generate import media

    folder = tmp_path_factory.mktemp("case")
    path = folder / "in.png"
    shutil.copy(image, path)
    for m in mutations:
        _apply_image(path, m)
    outcomes = []
    for read in (
        lambda: load_image(path, 8, 8),  # predict: ImagePromptDataModule
        lambda: media.fit_size(media.read_frames(media.probe(path), [0, 0]), 8, 8)[0],  # generate --input
        lambda: eval_frames(folder, 1),  # fourdgen eval: a folder of frames
    ):
        try:
            out = np.asarray(read())
            assert out.size and np.isfinite(out.astype(np.float64)).all()
            outcomes.append("read")
        except Exception as e:
            outcomes.append(clear(e, path))
    event(" | ".join(outcomes))


# ------------------------------------------------------------------------ videos for prediction
@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from fourdgen.data.scene_writer import write_video

    path = tmp_path_factory.mktemp("vid") / "in.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    write_video(path, frames, 8)
    return path


@fuzz(16)
@given(mutation=BYTES)
def test_malformed_input_videos_give_one_clear_error(video, tmp_path_factory, mutation):
    from fourdgen.evaluation.predictions import read_frames as eval_frames
    from fourdgen.generate import media

    path = tmp_path_factory.mktemp("case") / "in.mp4"
    shutil.copy(video, path)
    _bytes(path, *mutation)
    outcomes = []
    for read in (
        lambda: media.read_frames(p := media.probe(path), list(range(p.num_frames))),  # generate --input
        lambda: eval_frames(path),  # fourdgen eval
    ):
        try:
            out = read()
            assert out.ndim == 4 and out.shape[-1] == 3 and out.dtype == np.uint8
            outcomes.append("read")
        except Exception as e:
            outcomes.append(clear(e, path))
    event(" | ".join(outcomes))


# --------------------------------------------------------------- depth and pose predictions
ARRAY_EDITS = ["object", "complex", "1d", "4d", "nan_poses", "npz_other_key", "strings", "zero_size"]


@fuzz(40)
@given(
    kind=st.sampled_from(["depth.npy", "depth.npz", "poses.npy"]),
    mutation=st.one_of(
        st.tuples(st.just("bytes"), BYTES), st.tuples(st.just("edit"), st.sampled_from(ARRAY_EDITS))
    ),
)
def test_malformed_depth_and_pose_predictions_give_one_clear_error(tmp_path_factory, kind, mutation):
    from fourdgen.evaluation.predictions import read_camera_prediction, read_depth_prediction

    pred = tmp_path_factory.mktemp("pred")
    depth, w2c = np.ones((3, 4, 5), np.float32), np.tile(np.eye(4), (3, 1, 1))
    name, suffix = kind.split(".")
    path = pred / f"seq.{suffix}"
    arr = depth if name == "depth" else w2c
    (np.savez(path, depth=arr) if suffix == "npz" else np.save(path, arr))
    how, arg = mutation
    if how == "bytes":
        _bytes(path, *arg)
    else:
        new = {
            "object": np.array([{"a": 1}], dtype=object),
            "complex": arr.astype(np.complex64),
            "1d": arr.reshape(-1),
            "4d": arr[None],
            "nan_poses": np.full_like(arr, np.nan),
            "npz_other_key": arr,
            "strings": np.array(["a", "b"]),
            "zero_size": arr[:, :0],
        }[arg]
        if suffix == "npz":
            np.savez(path, **{"other" if arg == "npz_other_key" else "depth": new})
        else:
            np.save(path, new, allow_pickle=True)
    try:
        if name == "depth":
            out = read_depth_prediction(pred, "seq", 3, (4, 5))
        else:
            out = read_camera_prediction(pred, "seq", 3)
        assert out.dtype == np.float64
        event("read cleanly")
    except Exception as e:
        assert isinstance(e, SceneFormatError), f"{type(e).__name__}: {e}"
        event(clear(e, path))


# -------------------------------------------------------------- VGGT and Wan checkpoints (pins)
def test_vggt_checkpoints_with_wrong_keys_shapes_or_bytes_are_named(tmp_path):
    from fourdgen.backbones.vggt import VGGT
    from fourdgen.backbones.vggt_checkpoint import load_official, official_state_dict

    sd = official_state_dict(VGGT("tiny"))
    good = tmp_path / "model.safetensors"
    save_file(sd, str(good))
    load_official(VGGT("tiny"), good)
    key = (
        "camera_head.trunk.0.attn.qkv.weight"
        if "camera_head.trunk.0.attn.qkv.weight" in sd
        else sorted(sd)[5]
    )
    cases = {
        "renamed": {**{k: v for k, v in sd.items() if k != key}, key + "_x": sd[key]},
        "shape": {**sd, key: sd[key][:1].contiguous()},
    }
    for name, bad in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(
            KeyError, match=rf"{re.escape(str(path))} does not match VGGT\(.*{re.escape(key)}"
        ):
            load_official(VGGT("tiny"), path)
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:1000])
    torch.save({"model": sd}, tmp_path / "model.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:1000])
    torch.save({"model": [1, 2]}, tmp_path / "list.pt")
    load_official(VGGT("tiny"), tmp_path / "model.pt")
    for name, field in (("trunc.safetensors", "<file>"), ("trunc.pt", "<file>"), ("list.pt", "<file>")):
        with pytest.raises(FileFormatError, match=rf"{name}: field '{field}'"):
            load_official(VGGT("tiny"), tmp_path / name)


def test_wan_checkpoints_with_wrong_keys_shapes_or_bytes_are_named(tmp_path):
    """diffusers alone fills a weight the checkpoint lacks with random values (a log line): here a
    renamed, missing or reshaped tensor, a truncated file or a broken config is one error naming it."""
    good = tmp_path / "good"
    build_transformer(preset="tiny").save_pretrained(good / "transformer")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    build_transformer(path=str(good))
    sd = load_file(str(good / weights))
    key = "blocks.0.attn1.to_q.weight"

    def variant(name: str, tensors=None, raw: bytes | None = None, config: str | None = None) -> Path:
        root = tmp_path / name
        shutil.copytree(good, root)
        if tensors is not None:
            save_file(tensors, str(root / weights))
        if raw is not None:
            (root / weights).write_bytes(raw)
        if config is not None:
            (root / "transformer" / "config.json").write_text(config)
        return root

    rest = {k: v for k, v in sd.items() if k != key}
    cfg = json.loads((good / "transformer" / "config.json").read_text())
    cases = {
        "renamed": (
            variant("renamed", {**rest, key + "x": sd[key].clone()}),
            rf"field '{re.escape(key)}'.*missing",
        ),
        "dropped": (
            variant("dropped", rest),
            rf"field '{re.escape(key)}': expected a tensor of the checkpoint",
        ),
        "extra": (
            variant("extra", {**sd, "blocks.9.x": sd[key].clone()}),
            r"field 'blocks\.9\.x'.*unexpected",
        ),
        "shape": (
            variant("shape", {**sd, key: sd[key][:3].contiguous()}),
            r"field '<weights>'.*to_q\.weight.*shape",
        ),
        "truncated": (variant("truncated", raw=(good / weights).read_bytes()[:2000]), r"field '<weights>'"),
        "config": (variant("config", config="{"), r"field '<weights>'.*the config file"),
        "other_size": (
            variant("other_size", config=json.dumps({**cfg, "num_layers": 3})),
            r"field 'blocks\.2\..*missing",
        ),
    }
    for name, (root, pattern) in cases.items():
        with pytest.raises(FileFormatError, match=rf"{re.escape(str(root / 'transformer'))}: {pattern}"):
            build_transformer(path=str(root))
        assert name
