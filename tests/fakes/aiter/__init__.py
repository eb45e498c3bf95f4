"""A fake `aiter` for contract tests (CPU, torch): the functions dsv32's ROCm adapters call, with the names and
parameters of amd-aiter 0.1.7.post2.dev18 (tests/backends/test_aiter_api.py checks both against the real wheel) and
the semantics its sources and docstrings document, written here independently of dsv32's reference backend. It
models aiter's hazards where the adapters must handle them: MLA rows without keys come out NaN, the paged indexer
logits write whole chunks of keys past a row's context, the fused MoE reads only weights shuffled by shuffle_weight.
Not AMD's code, and no evidence that the real kernels behave the same on a GPU: that needs AMD hardware."""

import enum

import torch


class ActivationType(enum.Enum):
    No = -1
    Silu = 0
    Gelu = 1
    Swiglu = 2


class QuantType(enum.Enum):
    No = 0
    per_Tensor = 1
    per_Token = 2
    per_1x32 = 3
    per_1x128 = 4
    per_128x128 = 5


class dtypes:  # noqa: N801 - aiter's name
    fp8 = torch.float8_e4m3fnuz  # set by the contract tests to the architecture's format
    bf16 = torch.bfloat16
    fp16 = torch.float16
    fp32 = torch.float32
    i32 = torch.int32
