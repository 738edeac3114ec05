"""FSDP2 (fully_shard) shards QLoRA's 4-bit base; sharded training equals one process.

Single-process tests check the shardable form of NF4Linear (frozen integer
parameters instead of buffers, same outputs and state dict). The distributed
test runs ``lowrank_ext.finetune.fsdp_check`` once under torchrun (2 gloo
ranks on CPU) for three scenarios, each compared with one process training on
the same global batches; see that module for why the tolerance is 1e-5
(absolute, on losses and adapter weights):

* ``qlora``: double-quantized NF4 under every adapted projection;
* ``mixed``: fp32 scales (no double quantization), lowrank_ext's dense
  LoRALinear on o_proj in the same FSDP groups, gradient checkpointing; and
  a copy under ``MixedPrecisionPolicy(param_dtype=bfloat16)`` whose 4-bit
  layers must receive their codes and scales unrounded;
* ``compile``: the first sharded decoder layer under ``torch.compile`` (the
  ``aot_eager`` backend: dynamo and AOTAutograd trace the layer, our ops'
  fake kernels included, without inductor's C++ code generation, which
  takes minutes on two CPU cores).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowrank_ext import NF4Weight
from lowrank_ext.distributed import make_nf4_shardable, nf4_resident_bytes
from lowrank_ext.nn import NF4Linear

from test_distributed import PYTHON_ROOT, _torchrun_command

transformers = pytest.importorskip("transformers")

SCENARIOS = ("qlora", "mixed", "compile")


def _layer(double_quant: bool, bias: bool = True) -> NF4Linear:
    torch.manual_seed(0)
    return NF4Linear.from_linear(nn.Linear(96, 40, bias=bias), double_quant=double_quant)


# ------------------------------------------------------------ single process


@pytest.mark.parametrize("double_quant", [True, False])
def test_shardable_layer_holds_frozen_integer_parameters(double_quant):
    layer = _layer(double_quant)
    shardable = copy.deepcopy(layer).make_shardable()
    quantized = dict(shardable.named_parameters())
    names = {"weight", "weight_absmax"} | (
        {"weight_nested_absmax", "weight_nested_code"} if double_quant else set())
    assert names <= set(quantized)
    assert not dict(shardable.named_buffers())
    for name in names:
        # Integers only, so neither Module.to(dtype) nor FSDP's mixed
        # precision (param_dtype), which cast floating-point parameters, can
        # round the scales.
        assert not quantized[name].requires_grad
        assert not quantized[name].is_floating_point()
    input = torch.randn(5, 96)
    assert torch.equal(shardable(input), layer(input))
    assert torch.equal(shardable.dequantize(), layer.dequantize())
    assert shardable.make_shardable() is shardable  # idempotent


@pytest.mark.parametrize("double_quant", [True, False])
def test_shardable_state_dict_is_the_bitsandbytes_one(double_quant):
    layer = _layer(double_quant)
    shardable = copy.deepcopy(layer).make_shardable()
    expected, state = layer.state_dict(), shardable.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        if key.endswith("quant_state.bitsandbytes__nf4"):
            # Padded with spaces to a fixed width (see nf4_linear._STATE_WIDTH),
            # the same JSON object.
            assert json.loads(bytes(state[key].tolist())) == json.loads(bytes(value.tolist()))
            assert state[key].numel() % 256 == 0
        else:
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    # Both directions of loading.
    fresh = NF4Linear.from_linear(nn.Linear(96, 40), double_quant=double_quant).make_shardable()
    fresh.load_state_dict(expected)
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    plain = NF4Linear.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    plain.load_state_dict(state)
    assert torch.equal(plain.dequantize(), layer.dequantize())
    assert NF4Weight.from_state_dict(state).offset == layer.offset


def test_shardable_layer_keeps_its_codes_under_dtype_casts():
    layer = _layer(double_quant=False)
    shardable = copy.deepcopy(layer).make_shardable().to(torch.bfloat16)
    assert shardable.bias.dtype == torch.bfloat16
    assert torch.equal(shardable.dequantize(torch.float32), layer.dequantize(torch.float32))


def test_shardable_layer_takes_new_weights():
    layer = _layer(double_quant=True).make_shardable()
    dense = torch.randn(40, 96)
    layer.requantize(dense)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    expected = NF4Weight.from_float(dense, 64, True).dequantize(torch.float32)
    assert torch.equal(layer.dequantize(torch.float32), expected)


def test_make_nf4_shardable_on_a_qlora_model_keeps_trainable_parameters():
    from lowrank_ext import QLoRAModule

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=128)
    model = QLoRAModule(transformers.LlamaForCausalLM(config), r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    assert make_nf4_shardable(model) == 7
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == trainable
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    resident, whole = nf4_resident_bytes(model)
    assert resident == whole > 0  # not sharded yet: every byte is here


# ------------------------------------------------------- two ranks (torchrun)


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory):
    if not torch.distributed.is_available():  # pragma: no cover - every CI build has it
        pytest.skip("this torch build has no torch.distributed")
    output = tmp_path_factory.mktemp("fsdp_check")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_ROOT), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environment.setdefault("OMP_NUM_THREADS", "1")
    command = _torchrun_command() + [
        "--standalone", "--nproc_per_node", "2", "-m", "lowrank_ext.finetune.fsdp_check",
        "--scenarios", ",".join(SCENARIOS), "--compile-backend", "aot_eager",
        "--steps", "3", "--output-dir", str(output)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True,
                               timeout=300)
    path = output / "fsdp_check.json"
    assert path.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(path.read_text())
    result["log"] = completed.stdout[-3000:] + completed.stderr[-3000:]
    result["returncode"] = completed.returncode
    return result


def test_fsdp_run_used_two_gloo_ranks(fsdp_result):
    assert fsdp_result["world_size"] == 2 and fsdp_result["backend"] == "gloo"
    assert fsdp_result["returncode"] == 0 or not all(fsdp_result["passed"].values()), \
        fsdp_result["log"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp_matches_single_process(fsdp_result, scenario):
    index = SCENARIOS.index(scenario)
    entries = [ranked[index] for ranked in fsdp_result["ranks"]]
    assert all("error" not in entry for entry in entries), fsdp_result["log"]
    main = entries[0]
    # Each rank holds its half of the 4-bit codes and scales (plus FSDP's
    # padding of each tensor to a multiple of the world size).
    for entry in entries:
        assert entry["resident_fraction"] <= 0.55
        assert entry["whole_nf4_bytes"] > 0
    tolerance = 1e-5
    assert main["max_abs_loss_difference"] <= tolerance
    assert main["max_abs_adapter_difference"] <= tolerance
    # Meaningful only if training moved the adapter by far more than that.
    assert main["max_abs_change_from_initial"] > 1e-3
    # The frozen base, gathered, is the single process's bit for bit, in
    # bitsandbytes' keys, and parses as an NF4 weight.
    assert main["base_equal_to_single_process"] is True
    assert main["gathered_nf4_parses"] is True
    expected_keys = ["weight", "weight.absmax", "weight.quant_map",
                     "weight.quant_state.bitsandbytes__nf4"]
    if scenario != "mixed":
        expected_keys += ["weight.nested_absmax", "weight.nested_quant_map"]
    assert main["nf4_state_keys"] == sorted(expected_keys)
    # Adapter saved from rank 0 in PEFT's format.
    assert main["saved_adapter_keys_match"] is True
    assert main["max_abs_saved_adapter_difference"] <= tolerance
    if scenario == "mixed":
        assert main["has_dense_lora"] and main["gradient_checkpointing"]
        assert "LoRALinear" in main["layer_kinds"]
        # Under MixedPrecisionPolicy(param_dtype=bfloat16) the fp32 scales
        # reach the kernels unrounded.
        assert all(entry["mixed_precision_keeps_scales"] is True for entry in entries)
    if scenario != "compile":
        for entry in entries:
            assert entry["dcp_differed_before_load"] is True
            assert entry["dcp_reload_equal"] is True
            assert entry["dcp_outputs_equal"] is True
    assert fsdp_result["passed"][scenario] is True, fsdp_result["log"]
