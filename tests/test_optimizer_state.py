"""Distributed optimizer state saved in model space (spec R16.6), and loaded under another layout.

R16.6: a distributed optimizer's state is saved per parameter, at the parameter's global shape, under the
key that the same optimizer not distributed gives it; so it loads at any other data-parallel size, and
into the optimizer not distributed, without conversion. Two ways of sharding it are covered:

- FSDP2 (``fully_shard``), alone and over tensor parallelism: torch's ``get_optimizer_state_dict`` gives
  the state keyed by parameter name with ``DTensor`` values (``_StridedShard`` placements under TP),
  which a rank saves as it is (R16.2: a strided shard is several boxes).
- ZeRO-1/2 and ZeRO-3: each rank holds a contiguous range of the flattened, concatenated parameters
  (Megatron's distributed optimizer); ``flat_buffer_shards`` makes each parameter's part of the range a
  flat-range shard (R16.2) of a tensor of the parameter's shape.

Saved by 4 ranks (FSDP2 at DP=4, FSDP2+TP on a 2x2 mesh) and by 3 ranks (ZeRO, uneven ranges); loaded by
2 ranks (FSDP2 at DP=2, ZeRO at DP=2) and by this process (not distributed). Every loaded value must be
bit-identical to what was saved. The state must also train on: ZeRO's AdamW is elementwise, so one more
step after loading at another size is bit-identical to one more step of the saving world. FSDP2's next
step is compared with ``torch.allclose`` only: gradients are averaged by a reduce-scatter over a
different number of ranks, and TP splits the matmuls, so the sums round differently.
Three worlds in all, each started once for the module; a rank returns its tensors as bytes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
import torch.distributed as dist
from tessera.errors import ShardingError
from tessera.format.manifest import TensorEntry, ValueEntry
from tessera.state import ShardedTensor, flat_buffer_shards

from .conftest import assert_bit_equal, assert_tree_bit_equal
from .ranks import run_ranks


def _packed(result: Any) -> bytes:
    """A rank's result as bytes: a tensor put on the result queue as it is would be shared through a
    file descriptor that the rank serves, and the rank exits before the parent takes it."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _unpacked(data: bytes) -> Any:
    return torch.load(io.BytesIO(data))


# -- FSDP2 ----------------------------------------------------------------------------------------------

SIZES = (16, 22, 3)
"""Linear(16, 22), ReLU, Linear(22, 3): rows split unevenly over 4 ranks (6, 6, 6, 4 and 1, 1, 1, 0: the last
rank holds nothing of the second layer) and over (dp=2, tp=2), where FSDP2 splits each TP half."""
BATCH = 8
"""The global batch of every step, split evenly over the data-parallel ranks."""
STEPS = 3
"""Training steps before the save; the step after it (number ``STEPS``) is the one compared on resume."""
LR = 1e-2

FSDP_CHECKPOINTS = {"fsdp": "FSDP2 at DP=4", "fsdp_tp": "FSDP2 + TP on a (dp=2, tp=2) mesh"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.ReLU(), torch.nn.Linear(SIZES[1], SIZES[2])
    )


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def _train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, part: int, parts: int
) -> None:
    """Step ``step`` on this data-parallel rank's ``part`` of a seeded global batch (mean loss)."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(BATCH, SIZES[0], generator=generator)
    targets = torch.randn(BATCH, SIZES[2], generator=generator)
    rows = slice(part * BATCH // parts, (part + 1) * BATCH // parts)
    torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(tree: Any) -> Any:
    """``tree`` with every DTensor gathered whole (collective: every rank calls it the same way)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_full(v) for v in tree)
    return tree


def _placements(tree: dict[str, Any]) -> dict[str, str]:
    return {k: str(getattr(v, "placements", None)) for k, v in tree.items()}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What is saved: torch's model-space state dicts, keyed by parameter name (DTensor values)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p.detach()) for name, p in model.named_parameters()}


def _save_fsdp_world(rank: int, world_size: int, root: str) -> bytes | None:
    """Train, save, gather what was saved, and take one more step: at DP=4, then at (dp=2, tp=2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    out: dict[str, Any] = {}
    for name in FSDP_CHECKPOINTS:
        model = _model()
        if name == "fsdp":
            fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
            part, parts = rank, world_size
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
            fully_shard(model, mesh=mesh["dp"])
            part, parts = mesh.get_coordinate()[0], 2
        optimizer = _optimizer(model)
        for step in range(STEPS):
            _train_step(model, optimizer, step, part, parts)
        state = _state(model, optimizer)
        tessera.save(state, Path(root) / name, parallelism={"dp": parts, "tp": world_size // parts})
        saved = _full(state)
        placements = _placements(state["optim"]["state"]["0.weight"]) | {"model": _placements(state["model"])}
        _train_step(model, optimizer, STEPS, part, parts)
        out[name] = {"saved": saved, "placements": placements, "next": _params(model)}
    return _packed(out) if rank == 0 else None


def _resume_fsdp(root: str, name: str, rank: int, world_size: int) -> dict[str, Any]:
    """FSDP2 at DP=``world_size``: load through torch's templates, set them, read back, train one step."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = _optimizer(model)
    template = _state(model, optimizer)  # get_optimizer_state_dict initializes AdamW's state (lr=0 step)
    placements = _placements(template["optim"]["state"]["0.weight"])
    tessera.load(Path(root) / name, template)
    filled = _full(template)
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, optimizer, template["optim"])
    after_set = _full(_state(model, optimizer))
    _train_step(model, optimizer, STEPS, rank, world_size)
    return {"filled": filled, "after_set": after_set, "next": _params(model), "placements": placements}


# -- ZeRO: flat ranges ----------------------------------------------------------------------------------

SHAPES: dict[str, tuple[int, ...]] = {"a": (5, 7), "b": (11,), "c": (3, 3, 2)}
"""Three parameters of odd shapes: 35 + 11 + 18 = 64 elements, cut at 21 and 42 by DP=3, at 32 by DP=2."""
TOTAL = sum(math.prod(s) for s in SHAPES.values())
ZERO_CHECKPOINTS = {
    "zero12": "ZeRO-1/2 (bf16 parameters replicated)",
    "zero3": "ZeRO-3 (bf16 parameters flat)",
}


def _bounds(dp: int) -> list[int]:
    return [TOTAL * r // dp for r in range(dp + 1)]


def _flat_grad(step: int) -> torch.Tensor:
    return torch.randn(TOTAL, generator=torch.Generator().manual_seed(2000 + step))


def _views(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameters' views of a whole flat buffer."""
    sizes = [math.prod(shape) for shape in SHAPES.values()]
    return dict(
        zip(SHAPES, (v.view(s) for v, s in zip(flat.split(sizes), SHAPES.values(), strict=True)), strict=True)
    )


def _zero_optimizer(master: torch.nn.Parameter) -> torch.optim.Optimizer:
    return torch.optim.AdamW([master], lr=LR, weight_decay=0.1)


def _zero_state(
    master: torch.Tensor,
    state: dict[str, torch.Tensor],
    group: dict[str, Any],
    model: Any,
    span: tuple[int, int],
) -> dict[str, Any]:
    """A rank's model-space state dict: the keys of a torch AdamW over the three parameters, not distributed
    (``optimizer/state/~i/exp_avg``, R16.6), each holding this rank's flat range of that parameter."""
    exp_avg = flat_buffer_shards(state["exp_avg"], SHAPES, span)
    exp_avg_sq = flat_buffer_shards(state["exp_avg_sq"], SHAPES, span)
    per_param = {
        i: {"step": state["step"], "exp_avg": exp_avg[n], "exp_avg_sq": exp_avg_sq[n]}
        for i, n in enumerate(SHAPES)
        if n in exp_avg
    }
    return {
        "model": model,
        "master": flat_buffer_shards(master, SHAPES, span),
        "optimizer": {"state": per_param, "param_groups": [{**group, "params": list(range(len(SHAPES)))}]},
    }


def _save_zero_world(rank: int, world_size: int, root: str) -> bytes:
    """ZeRO at DP=``world_size``: AdamW on this rank's range of the flat fp32 master; save both ways."""
    span = tuple(_bounds(world_size)[rank : rank + 2])
    torch.manual_seed(1)
    master = torch.nn.Parameter(torch.randn(TOTAL)[span[0] : span[1]].clone())
    optimizer = _zero_optimizer(master)
    for step in range(STEPS):
        master.grad = _flat_grad(step)[span[0] : span[1]].clone()
        optimizer.step()
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, master.detach())
    bf16 = torch.cat(parts).bfloat16()
    state = optimizer.state[master]
    group = {k: v for k, v in optimizer.state_dict()["param_groups"][0].items() if k != "params"}
    models = {"zero12": _views(bf16), "zero3": flat_buffer_shards(bf16[span[0] : span[1]], SHAPES, span)}
    for name, model in models.items():
        tessera.save(_zero_state(master.detach(), state, group, model, span), Path(root) / name)
    saved = {"master": master.detach().clone(), **{k: v.clone() for k, v in state.items()}, "group": group}
    master.grad = _flat_grad(STEPS)[span[0] : span[1]].clone()
    optimizer.step()
    return _packed({"saved": saved, "next": {"master": master.detach().clone(), **optimizer.state[master]}})


def _zero_template(span: tuple[int, int], zero3: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """New flat buffers for ``span`` (NaN, so that an element left unfilled shows) and their template."""
    n = span[1] - span[0]
    buffers = {k: torch.full((n,), math.nan) for k in ("master", "exp_avg", "exp_avg_sq")}
    buffers["step"] = torch.zeros(())
    model = {param: torch.zeros(shape, dtype=torch.bfloat16) for param, shape in SHAPES.items()}
    if zero3:
        buffers["model"] = torch.full((n,), math.nan, dtype=torch.bfloat16)
        model = flat_buffer_shards(buffers["model"], SHAPES, span)
    template = _zero_state(buffers["master"], buffers, {}, model, span)
    template["optimizer"]["param_groups"] = []  # a leaf for the stored JSON value, whatever it holds
    return template, buffers


def _resume_zero(root: str, name: str, span: tuple[int, int]) -> dict[str, Any]:
    """Load into new flat buffers for ``span``, then one more AdamW step on them."""
    template, buffers = _zero_template(span, zero3=name == "zero3")
    loaded = tessera.load(Path(root) / name, template)
    # Every parameter's step tensor is loaded; they must agree, and the flat optimizer has one.
    steps = [s["step"] for s in loaded["optimizer"]["state"].values()]
    assert all(torch.equal(s, steps[0]) for s in steps), steps
    filled = {k: v.clone() for k, v in buffers.items()}
    filled["step"] = steps[0].clone()
    group = loaded["optimizer"]["param_groups"][0]
    master = torch.nn.Parameter(buffers["master"])
    optimizer = _zero_optimizer(master)
    optimizer.load_state_dict(
        {
            "state": {
                0: {"step": steps[0], "exp_avg": buffers["exp_avg"], "exp_avg_sq": buffers["exp_avg_sq"]}
            },
            "param_groups": [{**group, "params": [0]}],
        }
    )
    master.grad = _flat_grad(STEPS)[span[0] : span[1]].clone()
    optimizer.step()
    nxt = {"master": master.detach().clone(), **optimizer.state[master]}
    return {"filled": filled, "group": group, "model": loaded["model"], "next": nxt}


# -- the worlds -----------------------------------------------------------------------------------------


def _resume_world(rank: int, world_size: int, root: str) -> bytes:
    """Two ranks: each FSDP2 checkpoint at DP=2, each ZeRO checkpoint at DP=2."""
    out: dict[str, Any] = {name: _resume_fsdp(root, name, rank, world_size) for name in FSDP_CHECKPOINTS}
    span = tuple(_bounds(world_size)[rank : rank + 2])
    out |= {name: _resume_zero(root, name, span) for name in ZERO_CHECKPOINTS}
    return _packed(out)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("optimizer_state")


@pytest.fixture(scope="module")
def fsdp_saved(root: Path) -> dict[str, Any]:
    return _unpacked(run_ranks(4, _save_fsdp_world, str(root))[0])


@pytest.fixture(scope="module")
def zero_saved(root: Path) -> dict[str, Any]:
    """The saving world's flat buffers, concatenated in rank order: the global flat buffers."""
    per_rank = [_unpacked(r) for r in run_ranks(3, _save_zero_world, str(root))]
    out: dict[str, Any] = {"group": per_rank[0]["saved"]["group"]}
    for when in ("saved", "next"):
        out[when] = {k: torch.cat([r[when][k].reshape(-1) for r in per_rank]) for k in per_rank[0]["next"]}
        out[when]["step"] = per_rank[0][when]["step"]
        assert all(torch.equal(r[when]["step"], out[when]["step"]) for r in per_rank)
    return out


@pytest.fixture(scope="module")
def resumed_dp2(root: Path, fsdp_saved: dict[str, Any], zero_saved: dict[str, Any]) -> list[dict[str, Any]]:
    return [_unpacked(r) for r in run_ranks(2, _resume_world, str(root))]


# -- FSDP2 tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FSDP_CHECKPOINTS)
def test_fsdp2_state_is_saved_in_model_space(root: Path, fsdp_saved: dict[str, Any], name: str) -> None:
    """R16.6: loaded whole, not distributed, every tensor is the whole tensor the ranks held, at the
    parameter's shape, under the keys torch's own ``get_optimizer_state_dict`` gives (FQN-keyed)."""
    saved = fsdp_saved[name]["saved"]
    placements = fsdp_saved[name]["placements"]
    if name == "fsdp_tp":  # the case this test is for: FSDP2 over TP gives strided shards (R16.2)
        assert "_StridedShard" in placements["model"]["0.weight"], placements
        assert "_StridedShard" in placements["exp_avg"], placements
    else:
        assert placements["exp_avg"] == "(Shard(dim=0),)", placements
    loaded = tessera.load(root / name)
    assert loaded["optim"]["state"]["0.weight"]["exp_avg"].shape == (SIZES[1], SIZES[0])
    assert loaded["optim"]["state"]["2.weight"]["exp_avg_sq"].shape == (SIZES[2], SIZES[1])
    assert set(loaded["optim"]["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # Format 1.2 keeps tuples: betas comes back as the tuple it was, without a template (R3.22).
    assert_tree_bit_equal(loaded, saved)
    exp_avg = tessera.open(root / name).read("optim/state/0.weight/exp_avg")
    assert_bit_equal(exp_avg, saved["optim"]["state"]["0.weight"]["exp_avg"])


@pytest.mark.parametrize("name", FSDP_CHECKPOINTS)
def test_fsdp2_state_loads_into_fsdp2_at_dp2(
    fsdp_saved: dict[str, Any], resumed_dp2: list[dict[str, Any]], name: str
) -> None:
    """R16.6, R14: saved at DP=4 (or DP=2 x TP=2), loaded in place into FSDP2's DTensors at DP=2 (each
    rank reads its own rows), then set with ``set_*_state_dict``: bit-identical; one more step agrees
    with the saving world's to within rounding (a reduce-scatter over another number of ranks)."""
    reference = fsdp_saved[name]
    got = resumed_dp2[0][name]
    assert got["placements"]["exp_avg"] == "(Shard(dim=0),)"
    assert_tree_bit_equal(got["filled"], reference["saved"])
    assert_tree_bit_equal(got["after_set"], reference["saved"])
    for key, want in reference["next"].items():
        torch.testing.assert_close(got["next"][key], want, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", FSDP_CHECKPOINTS)
def test_fsdp2_state_loads_into_one_process(root: Path, fsdp_saved: dict[str, Any], name: str) -> None:
    """R16.6: the same checkpoint loads into the model and optimizer not distributed, through the very
    templates ``get_*_state_dict`` gives there (plain tensors under the same FQN keys)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reference = fsdp_saved[name]
    model = _model()
    optimizer = _optimizer(model)
    template = _state(model, optimizer)
    tessera.load(root / name, template)
    assert_tree_bit_equal(template, reference["saved"])
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, optimizer, template["optim"])
    assert_tree_bit_equal(_full(_state(model, optimizer)), reference["saved"])
    _train_step(model, optimizer, STEPS, 0, 1)
    for key, want in reference["next"].items():
        torch.testing.assert_close(_params(model)[key], want, rtol=1e-6, atol=1e-7, msg=key)


# -- ZeRO tests -----------------------------------------------------------------------------------------


def _model_space(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: _views(v) for k, v in flat.items() if k != "step"}


def _stored_group(zero_saved: dict[str, Any]) -> dict[str, Any]:
    """The param group as loaded without a template: betas the tuple it was (R3.22)."""
    group = zero_saved["group"]
    return {**group, "params": list(range(len(SHAPES)))}


@pytest.mark.parametrize("name", ZERO_CHECKPOINTS)
def test_zero_state_is_saved_in_model_space(root: Path, zero_saved: dict[str, Any], name: str) -> None:
    """R16.6, R16.2: ranges of 21, 21 and 22 elements, cut inside ``a`` and inside ``b``, stored as one
    tensor per parameter at its shape, under ``optimizer/state/~i/...``; no flat buffer is stored."""
    saved = zero_saved["saved"]
    per_param = _model_space(saved)
    checkpoint = tessera.open(root / name)
    for i, param in enumerate(SHAPES):
        for kind in ("exp_avg", "exp_avg_sq"):
            assert_bit_equal(checkpoint.read(f"optimizer/state/~{i}/{kind}"), per_param[kind][param])
        assert_bit_equal(checkpoint.read(f"optimizer/state/~{i}/step"), saved["step"])
        assert_bit_equal(checkpoint.read(f"master/{param}"), per_param["master"][param])
        assert_bit_equal(checkpoint.read(f"model/{param}"), per_param["master"][param].bfloat16())
    # Tensors at the parameters' shapes and the scalar steps; param_groups is one JSON value (R8.1).
    assert isinstance(checkpoint.entry("optimizer/param_groups"), ValueEntry)
    entries = [checkpoint.entry(path) for path in checkpoint if path != "optimizer/param_groups"]
    assert all(isinstance(e, TensorEntry) for e in entries)
    assert {e.layout.shape for e in entries} == {*SHAPES.values(), ()}
    loaded = tessera.load(root / name, keys=["optimizer/param_groups"])
    assert loaded["optimizer"]["param_groups"] == [_stored_group(zero_saved)]


@pytest.mark.parametrize("name", ZERO_CHECKPOINTS)
def test_zero_state_loads_at_dp2(
    zero_saved: dict[str, Any], resumed_dp2: list[dict[str, Any]], name: str
) -> None:
    """R16.6: saved at DP=3, loaded at DP=2 into new flat buffers through ``flat_buffer_shards``
    templates: every element bit-exact; one more AdamW step is bit-identical to DP=3's (elementwise)."""
    for when, what in (("saved", "filled"), ("next", "next")):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            got = torch.cat([r[name][what][key] for r in resumed_dp2])
            assert_bit_equal(got, zero_saved[when][key])
        for r in resumed_dp2:
            assert_bit_equal(r[name][what]["step"], zero_saved[when]["step"])
    for r in resumed_dp2:
        assert r[name]["group"] == _stored_group(zero_saved)
    if name == "zero3":
        got = torch.cat([r[name]["filled"]["model"] for r in resumed_dp2])
        assert_bit_equal(got, zero_saved["saved"]["master"].bfloat16())
    else:
        for r in resumed_dp2:
            assert_tree_bit_equal(r[name]["model"], _views(zero_saved["saved"]["master"].bfloat16()))


@pytest.mark.parametrize("name", ZERO_CHECKPOINTS)
def test_zero_state_loads_into_flat_buffers_at_dp1(root: Path, zero_saved: dict[str, Any], name: str) -> None:
    """R16.6: DP=1 with a flat buffer of every element: the range [0, 64) covers all three parameters."""
    template, buffers = _zero_template((0, TOTAL), zero3=name == "zero3")
    tessera.load(root / name, template)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert_bit_equal(buffers[key], zero_saved["saved"][key])
    if name == "zero3":
        assert_bit_equal(buffers["model"], zero_saved["saved"]["master"].bfloat16())


@pytest.mark.parametrize("name", ZERO_CHECKPOINTS)
def test_zero_state_loads_into_torch_adamw_not_distributed(
    root: Path, zero_saved: dict[str, Any], name: str
) -> None:
    """R16.6: loaded whole, the optimizer entry is a state dict that a torch AdamW over the three
    parameters, not distributed, takes as it is (``load_state_dict``); its next step is bit-identical to
    the next step of the three ZeRO ranks."""
    loaded = tessera.load(root / name)
    params = [torch.nn.Parameter(loaded["master"][param]) for param in SHAPES]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    optimizer.load_state_dict(loaded["optimizer"])
    for param, grad in zip(params, _views(_flat_grad(STEPS)).values(), strict=True):
        param.grad = grad.clone()
    optimizer.step()
    want = _model_space(zero_saved["next"])
    for i, (param, name_) in enumerate(zip(params, SHAPES, strict=True)):
        assert_bit_equal(param.detach(), want["master"][name_])
        for kind in ("exp_avg", "exp_avg_sq"):
            assert_bit_equal(optimizer.state[param][kind], want[kind][name_])
        assert_bit_equal(optimizer.state_dict()["state"][i]["step"], zero_saved["next"]["step"])


# -- flat_buffer_shards, no processes -------------------------------------------------------------------


def _shards(span: tuple[int, int]) -> tuple[torch.Tensor, dict[str, ShardedTensor]]:
    buffer = torch.arange(span[0], span[1], dtype=torch.float32)
    return buffer, flat_buffer_shards(buffer, SHAPES, span)


@pytest.mark.parametrize(
    ("span", "want"),
    [
        ((0, 35), {"a": (0, 35)}),
        ((35, 64), {"b": (0, 11), "c": (0, 18)}),
        ((0, 46), {"a": (0, 35), "b": (0, 11)}),
        ((10, 20), {"a": (10, 20)}),
        ((36, 45), {"b": (1, 10)}),
        ((30, 50), {"a": (30, 35), "b": (0, 11), "c": (0, 4)}),
        ((0, 64), {"a": (0, 35), "b": (0, 11), "c": (0, 18)}),
        ((20, 20), {}),
        ((35, 35), {}),
        ((64, 64), {}),
    ],
    ids=[
        "first",
        "last-two",
        "two-at-boundaries",
        "middle-of-a",
        "middle-of-b",
        "three",
        "all",
        "empty",
        "empty-at-boundary",
        "empty-at-end",
    ],
)
def test_flat_buffer_shards_ranges(span: tuple[int, int], want: dict[str, tuple[int, int]]) -> None:
    """R16.2: each parameter the range reaches is a flat range of a box of its whole global shape,
    holding the elements of the global flat index ``start..stop``; the others are left out."""
    buffer, shards = _shards(span)
    assert {n: s.flat_range for n, s in shards.items()} == want
    offsets = dict(zip(SHAPES, [0, 35, 46], strict=True))
    for param, shard in shards.items():
        shape = SHAPES[param]
        assert (shard.global_shape, shard.global_offset, shard.box_shape) == (shape, (0,) * len(shape), shape)
        assert shard.replica_id == 0
        first, last = shard.flat_range
        expected = torch.arange(offsets[param] + first, offsets[param] + last, dtype=torch.float32)
        assert_bit_equal(shard.local, expected)
        # The boxes held, in order, are exactly the flat range (several boxes where it is ragged).
        pieces = torch.cat([p.data.reshape(-1) for p in shard.pieces()]) if shard.pieces() else torch.empty(0)
        assert_bit_equal(pieces, expected)


def test_flat_buffer_shards_are_views_of_the_buffer() -> None:
    """Saving reads the buffer, loading fills it: every ``local`` (and each piece) shares its memory."""
    buffer, shards = _shards((30, 50))
    base = buffer.untyped_storage().data_ptr()
    for shard in shards.values():
        assert shard.local.untyped_storage().data_ptr() == base
    buffer.zero_()
    for shard in shards.values():
        for piece in shard.pieces():
            piece.data.fill_(7.0)
    assert bool((buffer == 7.0).all()), buffer
    shards["b"].local.fill_(-1.0)
    assert bool((buffer[5:16] == -1.0).all()) and bool((buffer[:5] == 7.0).all()), buffer


@pytest.mark.parametrize(
    ("buffer", "span", "message"),
    [
        (torch.zeros(10), (60, 70), "runs past the 64 elements"),
        (torch.zeros(65), (0, 65), "runs past the 64 elements"),
        (torch.zeros(9), (0, 10), "must be 1-d with 10 elements"),
        (torch.zeros(11), (0, 10), "must be 1-d with 10 elements"),
        (torch.zeros(2, 5), (0, 10), "must be 1-d with 10 elements"),
        (torch.zeros(0), (-1, -1), "must be 1-d"),
    ],
    ids=["past-the-end", "one-too-many", "buffer-too-small", "buffer-too-large", "buffer-2d", "negative"],
)
def test_flat_buffer_shards_refusals(buffer: torch.Tensor, span: tuple[int, int], message: str) -> None:
    with pytest.raises(ShardingError, match=message):
        flat_buffer_shards(buffer, SHAPES, span)


def test_flat_buffer_shards_save_in_one_process(tmp_path: Path) -> None:
    """R16.6 without processes: the whole flat buffer of one process saves as the three parameters."""
    buffer = torch.randn(TOTAL, generator=torch.Generator().manual_seed(3))
    tessera.save({"state": flat_buffer_shards(buffer, SHAPES, (0, TOTAL))}, tmp_path / "ckpt")
    loaded = tessera.load(tmp_path / "ckpt")
    assert_tree_bit_equal(loaded, {"state": _views(buffer)})


def test_flat_buffer_shards_keep_a_parameter_of_no_elements(tmp_path: Path) -> None:
    """R16.6: every parameter's state is saved at the parameter's shape, the empty ones too. No range
    reaches a parameter of no elements, so the ranges at its offset must hold it (empty); otherwise it
    is missing from the checkpoint, and the model's own ``state_dict()`` (which has it) cannot be loaded
    from a ZeRO-3 checkpoint (``unexpected`` keys)."""
    shapes = {"a": (2,), "empty": (0, 3), "b": (2,), "last": (0,)}
    flat = torch.arange(4.0)
    halves = [flat_buffer_shards(flat[lo:hi].clone(), shapes, (lo, hi)) for lo, hi in ((0, 2), (2, 4))]
    assert sorted(halves[0]) == ["a", "empty"] and sorted(halves[1]) == ["b", "empty", "last"]
    for shard in (halves[0]["empty"], halves[1]["empty"], halves[1]["last"]):
        assert shard.local.numel() == 0 and shard.flat_range == (0, 0)
    assert halves[1]["last"].global_shape == (0,) and halves[0]["empty"].global_shape == (0, 3)
    tessera.save({"model": flat_buffer_shards(flat, shapes, (0, 4))}, tmp_path / "ckpt")
    model = {name: torch.full(shape, math.nan) for name, shape in shapes.items()}
    tessera.load(tmp_path / "ckpt", {"model": model})
    assert_tree_bit_equal(
        model, {"a": flat[:2], "empty": torch.empty(0, 3), "b": flat[2:], "last": torch.empty(0)}
    )


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but the root ``zarr.json`` and the claim (R16.1 lets those differ)."""
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    return {k: v for k, v in files.items() if k not in ("zarr.json", ".tessera-claim.json")}


@pytest.mark.parametrize("name", [*FSDP_CHECKPOINTS, *ZERO_CHECKPOINTS])
def test_sharded_save_matches_a_single_process_save(
    root: Path, tmp_path: Path, fsdp_saved: dict[str, Any], zero_saved: dict[str, Any], name: str
) -> None:
    """R16.1: the ranks' checkpoint holds the same files, byte for byte, as one process saving the same
    global state not distributed (whole tensors at the parameters' shapes: R16.6 leaves nothing else)."""
    if name in FSDP_CHECKPOINTS:
        state = fsdp_saved[name]["saved"]
    else:
        flat = zero_saved["saved"]
        per_param = _model_space(flat)
        state = {
            "model": _views(flat["master"].bfloat16()),
            "master": per_param["master"],
            "optimizer": {
                "state": {
                    i: {
                        "step": flat["step"],
                        "exp_avg": per_param["exp_avg"][p],
                        "exp_avg_sq": per_param["exp_avg_sq"][p],
                    }
                    for i, p in enumerate(SHAPES)
                },
                "param_groups": [{**zero_saved["group"], "params": list(range(len(SHAPES)))}],
            },
        }
    tessera.save(state, tmp_path / "single")
    single, sharded = _files(tmp_path / "single"), _files(root / name)
    assert sorted(single) == sorted(sharded)
    assert [k for k in single if single[k] != sharded[k]] == []
