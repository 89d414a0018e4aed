"""tessera.lightning: Lightning's CheckpointIO writing Tessera checkpoints (issue 19, item 3).

A Trainer fits a tiny model a few steps with ``TesseraCheckpointIO`` and a ``ModelCheckpoint``;
a new Trainer resumes from the Tessera checkpoint and ends bit-exact where an uninterrupted run
ends. Then: no pickle in any written file, Fabric save/load, the conversions of what Tessera
does not store as is, the error naming a value that has no encoding, overwriting ``last.ckpt``
without losing it, DDP, S3. (Without Lightning: test_lightning_optional.py.)
"""

from __future__ import annotations

import enum
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera.errors import TensorMismatchError, UnsafeEncodingError

from .conftest import assert_bit_equal, assert_tree_bit_equal
from .ranks import run_ranks
from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (the 'lightning' extra)")
from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.utilities.data import AttributeDict  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from tessera.lightning import TesseraCheckpointIO  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

STEPS_PER_EPOCH = 4


class Tiny(pl.LightningModule):  # type: ignore[misc]
    """Adam and a StepLR, so that optimizer and scheduler state matter on resume."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
        self.losses: list[float] = []

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator)
    dataset = TensorDataset(inputs, torch.randn(8 * STEPS_PER_EPOCH, 1, generator=generator))
    return DataLoader(dataset, batch_size=8)


def _trainer(steps: int, devices: int = 1, **kwargs: Any) -> Any:
    return pl.Trainer(
        devices=devices,
        max_steps=steps,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
        **kwargs,
    )


def _pickle_free(root: Path) -> list[Path]:
    """Every file under ``root``; asserts none starts with a pickle header or torch.save's zip."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        head = path.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f"{path} is a pickle"
        assert head != b"PK", f"{path} is a zip (torch.save)"
    return files


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run of two epochs, and the same run stopped after one epoch and
    resumed by a new Trainer from the Tessera ``last.ckpt``."""
    root = tmp_path_factory.mktemp("lightning")
    whole = Tiny()
    _trainer(2 * STEPS_PER_EPOCH, enable_checkpointing=False).fit(whole, _data())

    first = Tiny()
    saver = ModelCheckpoint(dirpath=root / "ckpts", save_last=True, every_n_train_steps=1, save_top_k=1)
    _trainer(STEPS_PER_EPOCH, callbacks=[saver], plugins=[TesseraCheckpointIO()]).fit(first, _data())
    last = root / "ckpts" / "last.ckpt"
    files = _pickle_free(root)  # every step's checkpoint went through save and remove

    second = Tiny()
    resumer = ModelCheckpoint(dirpath=root / "ckpts2", save_last=True, every_n_train_steps=1, save_top_k=1)
    trainer = _trainer(2 * STEPS_PER_EPOCH, callbacks=[resumer], plugins=[TesseraCheckpointIO()])
    trainer.fit(second, _data(), ckpt_path=str(last))
    return {
        "root": root,
        "whole": whole,
        "first": first,
        "second": second,
        "trainer": trainer,
        "files": files,
    }


def test_resume_from_a_tessera_checkpoint_equals_an_uninterrupted_run(resumed: dict[str, Any]) -> None:
    whole, first, second = resumed["whole"], resumed["first"], resumed["second"]
    assert len(whole.losses) == 2 * STEPS_PER_EPOCH
    assert first.losses + second.losses == whole.losses  # the metrics of the continued run
    assert resumed["trainer"].global_step == 2 * STEPS_PER_EPOCH
    for name, tensor in whole.state_dict().items():
        assert_bit_equal(second.state_dict()[name], tensor)
    want = whole.trainer.optimizers[0].state_dict()
    assert_tree_bit_equal(resumed["trainer"].optimizers[0].state_dict(), want)
    assert resumed["trainer"].lr_scheduler_configs[0].scheduler.state_dict() == (
        whole.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )


def test_checkpoints_are_tessera_directories_without_pickle(resumed: dict[str, Any]) -> None:
    ckpts = resumed["root"] / "ckpts"
    # save_top_k=1 removed each older step's checkpoint; last.ckpt was saved over 4 times
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert (ckpts / "last.ckpt" / "zarr.json").is_file()
    assert tessera.verify(str(ckpts / "last.ckpt")).ok
    assert resumed["files"], "no file was written"
    _pickle_free(resumed["root"])
    loaded = TesseraCheckpointIO().load_checkpoint(ckpts / "last.ckpt")
    assert loaded["global_step"] == STEPS_PER_EPOCH
    assert type(loaded["state_dict"]) is OrderedDict
    assert loaded["state_dict"]._metadata["net.1"]["version"] == 2  # BatchNorm's, for load_state_dict
    callback = next(k for k in loaded["callbacks"] if k.startswith("ModelCheckpoint{"))
    assert loaded["callbacks"][callback]["last_model_path"] == str(ckpts / "last.ckpt")
    assert loaded["hyper_parameters"] == {"lr": 0.05}
    assert list(loaded["optimizer_states"][0]["state"]) == [0, 1, 2, 3, 4, 5]  # int keys stay ints
    assert type(loaded["optimizer_states"][0]["param_groups"][0]["betas"]) is tuple


def test_last_checkpoint_as_a_link(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=1, save_top_k=1)
    _trainer(2, callbacks=[saver], plugins=[TesseraCheckpointIO()]).fit(Tiny(), _data())
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert os.readlink(tmp_path / "last.ckpt") == "epoch=0-step=2.ckpt"
    assert TesseraCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    TesseraCheckpointIO().remove_checkpoint(tmp_path / "last.ckpt")  # the link goes, not its target
    assert os.listdir(tmp_path) == ["epoch=0-step=2.ckpt"]


def test_fabric_save_and_load(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[TesseraCheckpointIO()])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.zero_grad()
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    hparams = AttributeDict(width=3, name="x")
    fabric.save(tmp_path / "f.ckpt", {"model": model, "optimizer": optimizer, "step": 7, "hparams": hparams})
    _pickle_free(tmp_path)

    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    state = {"model": other, "optimizer": other_optimizer}
    rest = fabric.load(tmp_path / "f.ckpt", state)
    assert rest["step"] == 7 and type(rest["hparams"]) is AttributeDict and rest["hparams"].width == 3
    assert_tree_bit_equal(other.state_dict(), model.state_dict())
    assert_tree_bit_equal(other_optimizer.state_dict(), optimizer.state_dict())


class Color(enum.Enum):
    RED = "red"


def test_what_tessera_does_not_keep_as_is_comes_back_as_it_was(tmp_path: Path) -> None:
    weights: Any = OrderedDict(w=torch.arange(3.0))
    weights._metadata = OrderedDict({"": {"version": 1}})
    long_key = "Callback{" + ", ".join(f"'k{i}': None" for i in range(40)) + "}"  # > 255 bytes escaped
    checkpoint = {
        "state_dict": weights,
        "callbacks": {long_key: {"t": torch.tensor(math.inf)}, "": 1, "ModelCheckpoint{'a': None}": {"b": 2}},
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "param_groups": [{"betas": (0.9, 0.99)}]}
        ],
        "hyper_parameters": AttributeDict(lr=0.1, dims=(1, 2)),
        "shape": torch.Size([2, 3]),
        "color": Color.RED,
        "numbers": {1.5: "a", True: "b", None: "c", 7: float("nan")},
        "scalar": np.float32(2.5),
        "float64": np.float64(0.1),
        "blob": b"raw\x00bytes",
        "epoch": 0,
    }
    io = TesseraCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    _pickle_free(tmp_path)
    loaded = io.load_checkpoint(tmp_path / "c.ckpt")
    for name in ("scalar", "float64"):  # numpy scalars stay numpy scalars (np.float64 is a float too)
        scalar = loaded.pop(name)
        assert type(scalar) is type(checkpoint[name]) and scalar == checkpoint[name]
    assert_tree_bit_equal(loaded, {k: v for k, v in checkpoint.items() if k not in ("scalar", "float64")})
    assert loaded["state_dict"]._metadata == weights._metadata
    assert type(loaded["hyper_parameters"]) is AttributeDict and type(loaded["shape"]) is torch.Size
    assert loaded["color"] is Color.RED
    assert list(loaded["callbacks"]) == list(checkpoint["callbacks"])
    moved = io.load_checkpoint(tmp_path / "c.ckpt", map_location="cpu")
    assert type(moved["state_dict"]) is OrderedDict and moved["state_dict"]._metadata == weights._metadata


def test_a_value_without_encoding_is_an_error_naming_its_key(tmp_path: Path) -> None:
    checkpoint = {"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"act": torch.nn.ReLU}}
    with pytest.raises(UnsafeEncodingError, match=r"hyper_parameters/act.*allow_pickle=True"):
        TesseraCheckpointIO().save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()

    long_key = "Callback{" + ", ".join(f"'k{i}': None" for i in range(40)) + "}"
    with pytest.raises(
        UnsafeEncodingError, match=r"^callbacks/Callback\{'k0': None, .*\}/fn: a builtins.function"
    ):
        TesseraCheckpointIO().save_checkpoint({"callbacks": {long_key: {"fn": lambda: 0}}}, tmp_path / "d")

    trusting = TesseraCheckpointIO(allow_pickle=True)
    trusting.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    assert trusting.load_checkpoint(tmp_path / "c.ckpt")["hyper_parameters"]["act"] is torch.nn.ReLU
    with pytest.raises(UnsafeEncodingError, match="allow_pickle"):
        TesseraCheckpointIO().load_checkpoint(tmp_path / "c.ckpt")


def test_saving_over_a_checkpoint_never_loses_it(tmp_path: Path) -> None:
    io = TesseraCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(2)}, path)
    io.save_checkpoint({"step": 2, "w": torch.zeros(2)}, path)
    assert io.load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(TensorMismatchError):  # fails while writing the fresh sibling
        io.save_checkpoint({"step": 3, "w": torch.ones(2).to_sparse()}, path)
    assert io.load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]

    io.save_checkpoint({"step": 3, "w": torch.ones(2)}, tmp_path / ".last.ckpt.tessera-new-0a")
    io.save_checkpoint({"step": 3, "w": torch.ones(2)}, tmp_path / ".last.ckpt.tessera-old-0b")
    io.save_checkpoint({"step": 4, "w": torch.ones(2)}, path)  # cleans what crashed saves left
    assert os.listdir(tmp_path) == ["last.ckpt"]

    os.rename(path, tmp_path / ".last.ckpt.tessera-old-0123")  # a swap cut short between renames
    with pytest.raises(tessera.CheckpointNotFoundError, match=r"tessera-old-0123: rename it to last.ckpt"):
        io.load_checkpoint(path)


def test_other_checkpoints(tmp_path: Path) -> None:
    io = TesseraCheckpointIO()
    tessera.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "plain")  # tessera.save's: no notes
    assert_tree_bit_equal(io.load_checkpoint((tmp_path / "plain").as_uri()), {"w": torch.ones(2), "epoch": 3})
    torch.save({"epoch": 3}, tmp_path / "torch.ckpt")
    with pytest.raises(tessera.CheckpointNotFoundError, match=r"torch.ckpt is a file.*TorchCheckpointIO"):
        io.load_checkpoint(tmp_path / "torch.ckpt")


def test_storage_options_are_save_options(tmp_path: Path) -> None:
    io = TesseraCheckpointIO()
    options = tessera.SaveOptions(chunk_bytes=64, compression=tessera.Zstd(3))
    io.save_checkpoint({"w": torch.arange(64.0)}, tmp_path / "c.ckpt", storage_options=options)
    assert len(os.listdir(tmp_path / "c.ckpt" / "w" / "c")) == 4  # 64-byte chunks of 256 bytes
    assert_bit_equal(io.load_checkpoint(tmp_path / "c.ckpt")["w"], torch.arange(64.0))
    with pytest.raises(TypeError, match=r"storage_options=tessera.SaveOptions"):
        io.save_checkpoint({"w": torch.ones(1)}, tmp_path / "d.ckpt", storage_options={"a": 1})


def test_remove_checkpoint(tmp_path: Path) -> None:
    io = TesseraCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a" / "epoch=0-step=1.ckpt")
    io.remove_checkpoint(tmp_path / "a" / "epoch=0-step=1.ckpt")
    io.remove_checkpoint(tmp_path / "a" / "epoch=0-step=1.ckpt")  # absent: no error
    assert os.listdir(tmp_path / "a") == []


def test_on_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_server.bucket}/{s3_server.fresh_prefix()}/last.ckpt"
    io = TesseraCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(2)}, url)
    io.save_checkpoint({"step": 2, "w": torch.zeros(2)}, url)
    assert_tree_bit_equal(io.load_checkpoint(url), {"step": 2, "w": torch.zeros(2)})
    io.remove_checkpoint(url)
    with pytest.raises(tessera.CheckpointNotFoundError):
        io.load_checkpoint(url)


def _ddp_fit_and_resume(rank: int, world: int, root: str) -> tuple[list[float], list[float], list[str]]:
    """On each of ``world`` gloo ranks, a DDP Trainer: an uninterrupted run, and a run stopped
    and resumed from the Tessera checkpoint that rank 0 alone saved; the two runs' losses, and
    the names of the weights that differ at the end."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
    steps = 2 * STEPS_PER_EPOCH // world  # two epochs of the rank's share of the data
    whole = Tiny()
    _trainer(steps, world, strategy="ddp", enable_checkpointing=False).fit(whole, _data())
    first, second = Tiny(), Tiny()
    saver = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=1)
    _trainer(steps // 2, world, callbacks=[saver], strategy="ddp", plugins=[TesseraCheckpointIO()]).fit(
        first, _data()
    )
    resumer = _trainer(steps, world, strategy="ddp", plugins=[TesseraCheckpointIO()], default_root_dir=root)
    resumer.fit(second, _data(), ckpt_path=os.path.join(root, "last.ckpt"))
    want, got = whole.state_dict(), second.state_dict()
    differ = [name for name in want if want[name].numpy().tobytes() != got[name].numpy().tobytes()]
    return whole.losses, first.losses + second.losses, differ


def test_ddp_saves_on_rank_zero_alone_and_resumes(tmp_path: Path) -> None:
    """Lightning saves on rank 0 only: the save must not wait for the other rank (it would hang
    on tessera.save's world group); every rank then resumes from the one checkpoint."""
    for whole, resumed, differ in run_ranks(2, _ddp_fit_and_resume, str(tmp_path)):
        assert len(whole) == STEPS_PER_EPOCH and resumed == whole and differ == []
    assert tessera.verify(str(tmp_path / "last.ckpt")).ok
    _pickle_free(tmp_path)


def test_standalone_pytorch_lightning(tmp_path: Path) -> None:
    """The same class for the standalone package, whose CheckpointIO base is another class."""
    standalone = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    from pytorch_lightning.callbacks import ModelCheckpoint as StandaloneCheckpoint

    class Model(standalone.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"width": 4})
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    io = TesseraCheckpointIO()
    saver = StandaloneCheckpoint(dirpath=tmp_path, save_last=True)
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = standalone.Trainer(max_steps=2, accelerator="cpu", callbacks=[saver], plugins=[io], **options)
    assert trainer.strategy.checkpoint_io is io
    model = Model()
    trainer.fit(model, _data())
    loaded = io.load_checkpoint(tmp_path / "last.ckpt")
    assert loaded["global_step"] == 2 and loaded["hyper_parameters"] == {"width": 4}
    assert_bit_equal(loaded["state_dict"]["layer.weight"], model.layer.weight.detach())
    _pickle_free(tmp_path)
