"""``tessera.megatron``: Megatron-core ``dist_checkpointing`` saving to and loading from Tessera.

Real megatron-core (0.16.1 on the CPU machine, 0.19.x on the GPU machine) on real gloo ranks.
The state is a small GPT-like layout: a column-parallel and a row-parallel weight (TP-sharded),
layer norms stacked along a prepended layer axis (``prepend_axis_num``, TP replicas), a
distributed optimizer's ``exp_avg`` as ``flattened_range`` slices of each TP shard across DP,
a ``ShardedObject`` per TP rank, and common (non-sharded) state. Saved at TP 2 x DP 1, it is
loaded at TP 1 x DP 1 and at TP 1 x DP 2, bit-exact.

megatron-core 0.16 refuses ``flattened_range`` in ``ShardedTensor.__post_init__`` (and so in
``without_data``, which its sharding validation calls): the harness sets the attribute after
construction, as megatron-core <= 0.15's distributed optimizer made these shards, and passes
``validate_access_integrity=False`` for that state; a state without it is saved with Megatron's
validation on. Megatron's default ``torch_dist`` save calls CUDA, but with the Tessera strategy
neither Megatron's ``save`` nor its ``load`` reaches those calls: on gloo no workaround is needed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tessera.cli.main import main

from tests.conftest import assert_bit_equal
from tests.ranks import run_ranks

HAS_MEGATRON = importlib.util.find_spec("megatron") is not None and (
    importlib.util.find_spec("megatron.core") is not None
)
needs_megatron = pytest.mark.skipif(
    not HAS_MEGATRON, reason="megatron-core is not installed (pip install 'tessera-checkpoint[megatron]')"
)

FC1 = "decoder.mlp.linear_fc1.weight"
FC2 = "decoder.mlp.linear_fc2.weight"
NORM = "decoder.layers.input_layernorm.weight"
EXP_AVG = "optimizer.state.exp_avg." + FC1
INFO = "rank_info"
GLU = "decoder.mlp.glu.weight"


def _globals() -> dict[str, torch.Tensor]:
    """The global tensors every layout shards (deterministic, distinct bit patterns)."""
    return {
        FC1: torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6) / 7,
        FC2: (torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8) / 3).to(torch.bfloat16),
        NORM: torch.arange(2 * 6, dtype=torch.float64).reshape(2, 6) * 1.5,
        EXP_AVG: torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6) * -0.25,
        GLU + ".w": torch.arange(4 * 6, dtype=torch.float16).reshape(4, 6),
        GLU + ".v": -torch.arange(4 * 6, dtype=torch.float16).reshape(4, 6),
    }


def _glu_build(tp_rank: int, tp: int, key: str, t: torch.Tensor, replica_id: Any, flat: Any) -> Any:
    """A factory as Megatron's gated MLP has: one local tensor, stored as two TP-sharded keys."""
    from megatron.core.dist_checkpointing import ShardedTensor

    w, v = t.chunk(2)
    return {
        part: ShardedTensor.from_rank_offsets(f"{key}.{part}", x, (0, tp_rank, tp), replica_id=replica_id)
        for part, x in (("w", w), ("v", v))
    }


def _glu_merge(loaded: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([loaded["w"], loaded["v"]])


def _glu_local(tp_rank: int, tp: int) -> torch.Tensor:
    g = _globals()
    return torch.cat([g[GLU + ".w"].chunk(tp)[tp_rank], g[GLU + ".v"].chunk(tp)[tp_rank]])


def _state(tp_rank: int, tp: int, dp_rank: int, dp: int) -> dict[str, Any]:
    """One rank's Megatron sharded state dict (with data: for a save, or as a load template)."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    g = _globals()
    fc1 = g[FC1].chunk(tp, 0)[tp_rank].clone()
    fc2 = g[FC2].chunk(tp, 1)[tp_rank].clone()
    layers = [
        ShardedTensor.from_rank_offsets(
            NORM, g[NORM][i].clone(), (0, i, 2), replica_id=(0, tp_rank, dp_rank), prepend_axis_num=1
        )
        for i in range(2)
    ]
    # The distributed optimizer's state: this TP shard's box, flattened, split across DP.
    box = g[EXP_AVG].chunk(tp, 0)[tp_rank]
    n = box.numel() // dp
    exp_avg = ShardedTensor.from_rank_offsets(EXP_AVG, box.clone(), (0, tp_rank, tp), replica_id=0)
    exp_avg.data = box.reshape(-1)[dp_rank * n : (dp_rank + 1) * n].clone()
    exp_avg.flattened_range = slice(dp_rank * n, (dp_rank + 1) * n)  # 0.16 refuses it in __init__
    return {
        "model": {
            FC1: ShardedTensor.from_rank_offsets(FC1, fc1, (0, tp_rank, tp), replica_id=(0, 0, dp_rank)),
            FC2: ShardedTensor.from_rank_offsets(FC2, fc2, (1, tp_rank, tp), replica_id=(0, 0, dp_rank)),
            "layers": layers,
            "glu": ShardedTensorFactory(
                GLU,
                _glu_local(tp_rank, tp),
                functools.partial(_glu_build, tp_rank, tp),
                _glu_merge,
                replica_id=(0, 0, dp_rank),
            ),
        },
        "optimizer": {"exp_avg": exp_avg, "param_groups": [{"lr": 0.001, "betas": [0.9, 0.95]}]},
        "info": ShardedObject(INFO, {"tp_rank": tp_rank, "tp": tp}, (tp,), (tp_rank,), replica_id=dp_rank),
        "iteration": 7,
        "args": {"hidden_size": 6, "num_layers": 2},
    }


def _template(tp_rank: int, tp: int, dp_rank: int, dp: int) -> dict[str, Any]:
    """A load template: the layout's shards with garbage data, and both saved ``info`` cells."""
    from megatron.core.dist_checkpointing import ShardedObject

    state = _state(tp_rank, tp, dp_rank, dp)
    for leaf in [state["model"][FC1], state["model"][FC2], state["model"]["glu"], *state["model"]["layers"]]:
        leaf.data = torch.full_like(leaf.data, 99)
    state["optimizer"]["exp_avg"].data.fill_(99)
    state["info"] = [ShardedObject(INFO, None, (2,), (i,), replica_id=1) for i in range(2)]
    for key in ("iteration", "args"):
        del state[key]
    del state["optimizer"]["param_groups"]
    return state


def _check_loaded(loaded: dict[str, Any], tp_rank: int, tp: int, dp_rank: int, dp: int) -> None:
    want = _state(tp_rank, tp, dp_rank, dp)
    assert_bit_equal(loaded["model"][FC1], want["model"][FC1].data)
    assert_bit_equal(loaded["model"][FC2], want["model"][FC2].data)
    assert_bit_equal(loaded["model"]["glu"], _glu_local(tp_rank, tp))  # the factory's merge
    for got, layer in zip(loaded["model"]["layers"], want["model"]["layers"], strict=True):
        assert_bit_equal(got, layer.data)
    assert_bit_equal(loaded["optimizer"]["exp_avg"], want["optimizer"]["exp_avg"].data)
    assert loaded["info"] == [{"tp_rank": 0, "tp": 2}, {"tp_rank": 1, "tp": 2}]


def _init_megatron() -> Any:
    """megatron-core's ``dist_checkpointing``, with the backend ``("tessera", 1)`` registered (<= 0.16)."""
    import megatron.core.dist_checkpointing as mdc
    import tessera.megatron

    tessera.megatron.register()
    return mdc


def _save_rank(rank: int, world: int, root: str) -> None:
    """TP 2 x DP 1: through Megatron's own ``save`` (registry) and through ``tessera.megatron.save``."""
    mdc = _init_megatron()
    import tessera.megatron

    if tessera.megatron.register():  # megatron-core <= 0.16: the backend ("tessera", 1)
        mdc.save(_state(rank, 2, 0, 1), f"{root}/registry", ("tessera", 1), validate_access_integrity=False)
    tessera.megatron.save(_state(rank, 2, 0, 1), f"{root}/entry", validate_access_integrity=False)
    state = _state(rank, 2, 0, 1)
    del state["optimizer"]["exp_avg"]  # no flattened_range: Megatron's sharding validation runs
    tessera.megatron.save(state, f"{root}/validated")


def _load_rank(rank: int, world: int, root: str, tp: int, dp: int) -> list[str]:
    """Load every saved checkpoint at TP ``tp`` x DP ``dp``; the names of those loaded."""
    mdc = _init_megatron()
    import tessera.megatron

    tp_rank, dp_rank = rank % tp, rank // tp
    done = []
    # A plain load: the strategy comes from metadata.json (saved where megatron-core has a registry).
    if Path(root, "registry", "metadata.json").exists():
        loaded = mdc.load(
            _template(tp_rank, tp, dp_rank, dp), f"{root}/registry", validate_access_integrity=False
        )
        _check_loaded(loaded, tp_rank, tp, dp_rank, dp)
        assert loaded["iteration"] == 7  # from Megatron's common.pt
        done.append("registry")
        loaded = mdc.load(
            _template(tp_rank, tp, dp_rank, dp), f"{root}/entry", validate_access_integrity=False
        )
        _check_loaded(loaded, tp_rank, tp, dp_rank, dp)
        assert loaded["args"] == {"hidden_size": 6, "num_layers": 2}  # read from Tessera, not common.pt
        done.append("entry via dist_checkpointing.load")
    loaded = tessera.megatron.load(_template(tp_rank, tp, dp_rank, dp), f"{root}/entry")
    _check_loaded(loaded, tp_rank, tp, dp_rank, dp)
    assert loaded["iteration"] == 7
    assert loaded["args"] == {"hidden_size": 6, "num_layers": 2}
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.001, "betas": [0.9, 0.95]}]
    done.append("entry")
    if tp == 1 and dp == 1:
        template = _template(0, 1, 0, 1)
        del template["optimizer"]["exp_avg"]
        loaded = tessera.megatron.load(template, f"{root}/validated")
        assert_bit_equal(loaded["model"][FC1], _globals()[FC1])
        assert_bit_equal(loaded["model"][FC2], _globals()[FC2])
        done.append("validated")
    return done


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("megatron")
    (root / "registry").mkdir()  # Megatron's save wants the directory to exist
    run_ranks(2, _save_rank, str(root))
    return root


def _is_pickle(head: bytes) -> bool:
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:2] == b"PK"


def _pickles(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and _is_pickle(p.read_bytes()[:2])
    )


@needs_megatron
def test_saved_layout_has_no_pickle_and_verifies(saved: Path) -> None:
    import tessera

    entry = saved / "entry"
    assert json.loads((entry / "metadata.json").read_text()) == {
        "sharded_backend": "tessera",
        "sharded_backend_version": 1,
        "common_backend": "tessera",
        "common_backend_version": 1,
    }
    assert sorted(p.name for p in entry.iterdir()) == ["metadata.json", "tessera"]
    assert _pickles(entry) == []
    report = tessera.verify(entry / "tessera")
    assert report.ok, report.problems
    assert main(["verify", "-q", str(entry / "tessera")]) == 0  # the `tessera verify` command
    stored = tessera.load(
        entry / "tessera", keys=["tensors/" + FC1, "tensors/" + GLU + ".w", "objects", "common"]
    )
    assert_bit_equal(stored["tensors"][FC1], _globals()[FC1])
    assert_bit_equal(stored["tensors"][GLU + ".w"], _globals()[GLU + ".w"])  # the factory's build
    assert stored["objects"][INFO] == {0: {"tp_rank": 0, "tp": 2}, 1: {"tp_rank": 1, "tp": 2}}
    assert stored["common"]["iteration"] == 7
    registry = saved / "registry"
    # Megatron's own save (<= 0.16): metadata.json names the backend; common.pt is Megatron's pickle.
    if (registry / "metadata.json").exists():
        config = json.loads((registry / "metadata.json").read_text())
        assert (config["sharded_backend"], config["sharded_backend_version"]) == ("tessera", 1)
        assert _pickles(registry) == ["common.pt"]
        assert tessera.verify(registry / "tessera").ok


@needs_megatron
def test_load_tp2_to_tp1(saved: Path) -> None:
    done = run_ranks(1, _load_rank, str(saved), 1, 1)
    assert {"entry", "validated"} <= set(done[0])


@needs_megatron
def test_load_dp_change(saved: Path) -> None:
    """TP 2 x DP 1 saved, TP 1 x DP 2 loaded: each DP rank reads its half of the flattened state."""
    done = run_ranks(2, _load_rank, str(saved), 1, 2)
    assert all("entry" in d for d in done)


@needs_megatron
def test_sharded_metadata_lists_tensors_and_object_cells(saved: Path) -> None:
    from tessera.megatron import TesseraLoadStrategy

    metadata = TesseraLoadStrategy().load_sharded_metadata(saved / "entry")
    tensors = [EXP_AVG, FC1, FC2, GLU + ".v", GLU + ".w", NORM]
    assert sorted(metadata) == sorted([*tensors, f"{INFO}/shard_0_2", f"{INFO}/shard_1_2"])
    assert metadata[FC2].global_shape == (4, 8) and metadata[FC2].dtype == torch.bfloat16


@needs_megatron
def test_non_json_sharded_object_is_refused_naming_its_key(tmp_path: Path) -> None:
    from megatron.core.dist_checkpointing import ShardedObject
    from tessera import UnsafeEncodingError
    from tessera.megatron import TesseraSaveStrategy

    state = {"rng": ShardedObject("rng_state", {1, 2}, (1,), (0,))}
    with pytest.raises(UnsafeEncodingError, match="'rng_state'.*never pickles"):
        TesseraSaveStrategy().save(state, tmp_path)
    assert not (tmp_path / "tessera").exists()


@needs_megatron
def test_non_json_common_value_is_refused_naming_its_key(tmp_path: Path) -> None:
    """Megatron keeps ``args`` (an ``argparse.Namespace``) in the common state: not JSON, not pickled."""
    import argparse

    import tessera.megatron
    from megatron.core.dist_checkpointing import ShardedTensor
    from tessera import UnsafeEncodingError

    state = {
        "w": ShardedTensor.from_rank_offsets("w", torch.ones(2)),
        "args": argparse.Namespace(hidden_size=6),
    }
    with pytest.raises(UnsafeEncodingError, match="common/args: a argparse.Namespace"):
        tessera.megatron.save(state, tmp_path / "ckpt", validate_access_integrity=False)
    assert not (tmp_path / "ckpt" / "tessera").exists()


def test_import_without_megatron_says_which_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['megatron'] = None\n"
        "import tessera, tessera.megatron\n"
        "try:\n"
        "    tessera.megatron.TesseraSaveStrategy()\n"
        "except tessera.TesseraError as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MegatronNotInstalledError | tessera.megatron needs megatron-core")
    assert "pip install 'tessera-checkpoint[megatron]'" in out
    assert out.count("\n") == 1


@needs_megatron
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_into_gpu_shards(saved: Path) -> None:
    """A template on the GPU is filled on the GPU (one process, no process group)."""
    import tessera.megatron

    template = _template(0, 1, 0, 1)
    for leaf in [template["model"][FC1], template["model"][FC2], template["optimizer"]["exp_avg"]]:
        leaf.data = leaf.data.cuda()
    loaded = tessera.megatron.load(template, saved / "entry")
    assert loaded["model"][FC1].is_cuda and loaded["optimizer"]["exp_avg"].is_cuda
    _check_loaded(
        {
            **loaded,
            "model": {**loaded["model"], FC1: loaded["model"][FC1].cpu(), FC2: loaded["model"][FC2].cpu()},
            "optimizer": {"exp_avg": loaded["optimizer"]["exp_avg"].cpu()},
        },
        0,
        1,
        0,
        1,
    )
