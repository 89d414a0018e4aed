"""Stock Zarr readers read a checkpoint that Tessera saved to S3, bit for bit, with no Tessera
code on the reading side (issue 18, R2.1): tensorstore's ``zarr3`` driver on its ``s3``
kvstore, and zarr-python 3 on an obstore ``S3Store`` through ``zarr.storage.ObjectStore``.

The array paths come from the root ``zarr.json`` read as plain JSON. As in tests/test_interop.py,
the one Tessera import of the zarr-python reader is ``tessera.format.zarr_dtypes``, which
registers bfloat16 (zarr-python has no such type; tensorstore knows it natively); the
``crc32c`` codec is both libraries' own.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tessera
import torch

from .conftest import bits, random_tensor
from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import s3_env  # noqa: F401 - the fixture, used by name

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")
ts = pytest.importorskip("tensorstore", reason="tensorstore is in the test extra")
zarr = pytest.importorskip("zarr", reason="zarr-python is in the test extra")

import tessera.format.zarr_dtypes  # noqa: E402, F401 - registers bfloat16 with zarr-python
from obstore.store import S3Store  # noqa: E402
from zarr.storage import ObjectStore  # noqa: E402

STATE_SHAPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "model/w": ("bfloat16", (37, 11)),  # many chunks, edge chunks in both dimensions
    "model/b": ("float32", (29,)),
    "model/h": ("float16", (6, 5)),
    "optim/step_count": ("int64", ()),  # 0-d
    "optim/mask": ("bool", (17,)),
    "optim/codes": ("uint8", (3, 4, 5)),
    "scale": ("float64", ()),  # 0-d at the top level
}
CHUNK_BYTES = 64


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {"model": {}, "optim": {}, "epoch": 3}
    for i, (path, (dtype, shape)) in enumerate(STATE_SHAPES.items()):
        *parents, name = path.split("/")
        where = state[parents[0]] if parents else state
        where[name] = random_tensor(dtype, shape, seed=40 + i)
    return state


def _want(state: dict[str, Any], path: str) -> torch.Tensor:
    node: Any = state
    for part in path.split("/"):
        node = node[part]
    assert isinstance(node, torch.Tensor)
    return node


@pytest.fixture(scope="module")
def saved(s3_server: S3Server) -> tuple[str, dict[str, Any], dict[str, str]]:  # noqa: F811
    """One checkpoint saved by ``s3://`` URL; its prefix, the state, and each tensor's array path
    as the manifest (the root ``zarr.json``, read as plain JSON) names it."""
    prefix = f"{s3_server.fresh_prefix()}/ckpt"
    state = _state()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        tessera.save(
            state, f"s3://{s3_server.bucket}/{prefix}", options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES)
        )
    store = _obstore(s3_server, prefix)
    root = json.loads(bytes(obstore.get(store, "zarr.json").bytes()))
    entries = root["attributes"]["tessera"]["entries"]
    paths = {"/".join(e["key"]): e["path"] for e in entries if e["kind"] == "tensor"}
    assert sorted(paths) == sorted(STATE_SHAPES)
    chunks = [e["chunk_count"] for e in entries if e["kind"] == "tensor" and e["key"] == ["model", "w"]]
    assert chunks[0] > 4  # the multi-chunk array really has many chunks
    return prefix, state, paths


def _obstore(server: S3Server, prefix: str) -> Any:
    env = server.env()
    return S3Store(
        server.bucket,
        prefix=prefix,
        config={
            "endpoint": server.endpoint,
            "region": env["AWS_REGION"],
            "access_key_id": env["AWS_ACCESS_KEY_ID"],
            "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        },
        client_options={"allow_http": True},
    )


def _tensorstore_read(server: S3Server, prefix: str, path: str) -> np.ndarray:
    env = server.env()
    spec = {
        "driver": "zarr3",
        "kvstore": {
            "driver": "s3",
            "bucket": server.bucket,
            "path": f"{prefix}/{path}/",
            "endpoint": server.endpoint,
            "aws_region": env["AWS_REGION"],
            "aws_credentials": {
                "type": "environment",
            },
        },
    }
    store = ts.open(spec, read=True).result()
    return np.asarray(store.read().result())


def _zarr_read(server: S3Server, prefix: str, path: str) -> np.ndarray:
    store = ObjectStore(_obstore(server, prefix), read_only=True)
    return np.asarray(zarr.open_array(store=store, path=path, mode="r")[...])


@pytest.mark.parametrize("reader", ["tensorstore", "zarr-python"])
def test_stock_readers_read_every_tensor_from_s3_bit_exact(
    saved: tuple[str, dict[str, Any], dict[str, str]],
    s3_env: S3Server,  # noqa: F811
    reader: str,
) -> None:
    prefix, state, paths = saved
    read = _tensorstore_read if reader == "tensorstore" else _zarr_read
    for key, path in paths.items():
        want = _want(state, key)
        got = read(s3_env, prefix, path)
        assert got.shape == tuple(want.shape), key
        assert got.dtype.name == STATE_SHAPES[key][0], key
        assert got.tobytes() == bits(want), key
