"""Honest failure and thread safety.

* Every public op is called with each kind of bad input in a subprocess: each
  call must raise a Python exception and the interpreter must survive.
* Results are identical under concurrent calls from Python threads and under
  any torch.set_num_threads setting.
* Index arithmetic is 64-bit: a tensor of more than 2**31 elements
  dequantizes and quantizes correctly past element 2**31.
"""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import lowrank_ext
from lowrank_ext import ops

# Each entry: (label, python expression that must raise). Evaluated in a child
# interpreter with `torch`, `ops`, `lowrank_ext` and a few valid tensors defined.
BAD_CALLS = [
    ("quantize int tensor", "ops.nf4_quantize(torch.ones(64, dtype=torch.int64))"),
    ("quantize float64", "ops.nf4_quantize(torch.ones(64, dtype=torch.float64))"),
    ("quantize empty", "ops.nf4_quantize(torch.empty(0))"),
    ("quantize blocksize 0", "ops.nf4_quantize(weight, 0)"),
    ("quantize blocksize -64", "ops.nf4_quantize(weight, -64)"),
    ("quantize blocksize 2**40", "ops.nf4_quantize(weight, 2**40)"),
    ("quantize NaN", "ops.nf4_quantize(torch.full((64,), float('nan')))"),
    ("quantize not a tensor", "ops.nf4_quantize([1.0, 2.0])"),
    ("dequantize short packed", "ops.nf4_dequantize(packed[:3], absmax, (40, 64))"),
    ("dequantize huge shape", "ops.nf4_dequantize(packed, absmax, (2**40, 2**40))"),
    ("dequantize negative shape", "ops.nf4_dequantize(packed, absmax, (-40, -64))"),
    ("dequantize empty shape", "ops.nf4_dequantize(packed, absmax, (0,))"),
    ("dequantize wrong absmax dtype", "ops.nf4_dequantize(packed, absmax.half(), (40, 64))"),
    ("dequantize packed float", "ops.nf4_dequantize(packed.float(), absmax, (40, 64))"),
    ("dequantize int dtype", "ops.nf4_dequantize(packed, absmax, (40, 64), 64, torch.int8)"),
    ("dequantize blocksize 63", "ops.nf4_dequantize(packed, absmax, (40, 64), 63)"),
    ("8bit code too short", "ops.quantize_blockwise_8bit(torch.randn(10), code[:10])"),
    ("8bit unsorted code", "ops.quantize_blockwise_8bit(torch.randn(10), code.flip(0))"),
    ("8bit NaN", "ops.quantize_blockwise_8bit(torch.tensor([float('nan')] * 4), code)"),
    ("8bit blocksize 0", "ops.quantize_blockwise_8bit(torch.randn(10), code, 0)"),
    ("8bit dequant short absmax",
     "ops.dequantize_blockwise_8bit(torch.zeros(600, dtype=torch.uint8), torch.ones(1), code)"),
    ("nf4_linear wrong in_features", "ops.nf4_linear(torch.randn(2, 63), *nf4.linear_args())"),
    ("nf4_linear int input",
     "ops.nf4_linear(torch.ones(2, 64, dtype=torch.int32), *nf4.linear_args())"),
    ("nf4_linear bad bias",
     "ops.nf4_linear(torch.randn(2, 64), *nf4.linear_args(), bias=torch.randn(3))"),
    ("nf4_linear scalar input", "ops.nf4_linear(torch.tensor(1.0), *nf4.linear_args())"),
    ("lora_linear bad A",
     "ops.lora_linear(torch.randn(2, 64), torch.randn(40, 64), None, torch.randn(4, 63),"
     " torch.randn(40, 4), 1.0)"),
    ("lora_linear bad B",
     "ops.lora_linear(torch.randn(2, 64), torch.randn(40, 64), None, torch.randn(4, 64),"
     " torch.randn(41, 4), 1.0)"),
    ("lora_linear dtype mix",
     "ops.lora_linear(torch.randn(2, 64), torch.randn(40, 64), None,"
     " torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(40, 4), 1.0)"),
    ("qlora_linear bad lora_input",
     "ops.qlora_linear(torch.randn(2, 64), *nf4.linear_args(), None, torch.randn(4, 64),"
     " torch.randn(40, 4), 1.0, lora_input=torch.randn(3, 64))"),
    ("multi_lora index out of range",
     "ops.multi_lora_linear(torch.randn(2, 64), torch.randn(2, 40), *stacked,"
     " torch.ones(2), torch.tensor([0, 5]))"),
    ("multi_lora rank above max",
     "ops.multi_lora_linear(torch.randn(2, 64), torch.randn(2, 40), stacked[0], stacked[1],"
     " torch.tensor([9, 1]), torch.ones(2), torch.tensor([0, 1]))"),
    ("multi_lora wrong base_output",
     "ops.multi_lora_linear(torch.randn(2, 64), torch.randn(3, 40), *stacked,"
     " torch.ones(2), torch.tensor([0, 1]))"),
    ("set unknown ISA", "lowrank_ext.set_cpu_isa('avx9000')"),
    ("LoRALinear rank 0", "lowrank_ext.nn.LoRALinear(torch.nn.Linear(4, 4), r=0)"),
    ("LoRALinear negative alpha", "lowrank_ext.nn.LoRALinear(torch.nn.Linear(4, 4), alpha=-1)"),
    ("LoRALinear dropout 1", "lowrank_ext.nn.LoRALinear(torch.nn.Linear(4, 4), dropout=1.0)"),
    ("LoRALinear wrong input", "lowrank_ext.nn.LoRALinear(torch.nn.Linear(4, 4))(torch.randn(2, 5))"),
    ("QLoRALinear on a conv",
     "lowrank_ext.nn.QLoRALinear.from_linear(torch.nn.Conv1d(4, 4, 1))"),
    ("QLoRALinear NaN weight",
     "lowrank_ext.nn.QLoRALinear.from_linear(nan_linear)"),
    ("LoRAModule unknown target",
     "lowrank_ext.LoRAModule(torch.nn.Sequential(torch.nn.Linear(4, 4)), target_modules=['nope'])"),
    ("AdaLoRA without total_step",
     "lowrank_ext.AdaLoRAModule(torch.nn.Sequential(torch.nn.Linear(4, 4)), target_modules=['0'])"),
    ("load_adapter from a missing folder",
     "lowrank_ext.load_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), '/nonexistent-adapter')"),
    ("NF4Weight from a list", "lowrank_ext.NF4Weight.from_float([1.0, 2.0])"),
]

PRELUDE = """
import torch, lowrank_ext
from lowrank_ext import ops
weight = torch.randn(40, 64)
packed, absmax = ops.nf4_quantize(weight)
code = lowrank_ext.dynamic_map()
nf4 = lowrank_ext.NF4Weight.from_float(weight)
stacked = ops.stack_lora_factors([torch.randn(4, 64), torch.randn(2, 64)],
                                 [torch.randn(40, 4), torch.randn(40, 2)])[:2]
nan_linear = torch.nn.Linear(4, 4)
with torch.no_grad():
    nan_linear.weight[0, 0] = float("nan")
"""


def test_bad_input_raises_and_never_crashes():
    script = PRELUDE + textwrap.dedent("""
        import json, sys
        cases = json.loads(sys.argv[1])
        raised = 0
        for label, expression in cases:
            try:
                eval(expression)
            except Exception as error:  # what we check: a Python exception, with a message
                assert str(error), label
                raised += 1
            else:
                print("DID NOT RAISE:", label)
        print("raised", raised, "of", len(cases))
    """)
    import json

    result = subprocess.run([sys.executable, "-c", script, json.dumps(BAD_CALLS)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"raised {len(BAD_CALLS)} of {len(BAD_CALLS)}" in result.stdout, result.stdout


def test_concurrent_calls_from_threads_give_identical_results():
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(257, 129, generator=generator) for _ in range(4)]
    nf4 = lowrank_ext.NF4Weight.from_float(torch.randn(96, 129, generator=generator))
    inputs = [torch.randn(5, 129, generator=generator) for _ in range(4)]

    def compute(index):
        packed, absmax = ops.nf4_quantize(weights[index], 64)
        restored = ops.nf4_dequantize(packed, absmax, weights[index].shape, 64)
        return packed, absmax, restored, ops.nf4_linear(inputs[index], *nf4.linear_args())

    expected = [compute(i) for i in range(4)]
    failures = []

    def worker(index):
        for _ in range(25):
            for got, want in zip(compute(index), expected[index]):
                if not torch.equal(got, want):
                    failures.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_results_identical_for_any_thread_count(threads):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(1000, 333, generator=generator)
    nf4 = lowrank_ext.NF4Weight.from_float(weight)
    x = torch.randn(7, 333, generator=generator)
    reference = (ops.nf4_quantize(weight), ops.nf4_linear(x, *nf4.linear_args()))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = (ops.nf4_quantize(weight), ops.nf4_linear(x, *nf4.linear_args()))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(got[0], reference[0]))
    assert torch.equal(got[1], reference[1])


def test_index_arithmetic_is_64_bit():
    # 2**31 + 4160 elements: every block past element 2**31 would be read from
    # or written to the wrong place with 32-bit offsets. bf16 keeps it at ~5 GB.
    numel = 2**31 + 4160
    generator = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(-(-numel // 64), generator=generator) + 0.5
    restored = ops.nf4_dequantize(packed, absmax, (numel,), 64, torch.bfloat16)
    tail_start = 2**31 - 64  # a block-aligned window straddling element 2**31
    tail = slice(tail_start, numel)
    expected_tail = ops.nf4_dequantize(packed[tail_start // 2:], absmax[tail_start // 64:],
                                       (numel - tail_start,), 64, torch.bfloat16)
    assert torch.equal(restored[tail], expected_tail)
    repacked, reabsmax = ops.nf4_quantize(restored, 64)
    del restored
    tail_packed, tail_absmax = ops.nf4_quantize(expected_tail, 64)
    assert torch.equal(repacked[tail_start // 2:], tail_packed)
    assert torch.equal(reabsmax[tail_start // 64:], tail_absmax)
