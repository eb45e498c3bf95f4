"""Backend registry (entry points, selection, overrides, per-op fallback) and the `dsv32` command line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from dsv32.core import registry
from dsv32.core.ops import OP_NAMES, Ops


class _PartialOps(Ops):
    name = "partial"

    def rms_norm(self, x, weight, eps, residual=None):
        from dsv32.backends.reference.ops import ReferenceOps

        return ReferenceOps.rms_norm(self, x, weight, eps, residual)


class _PartialBackend:
    name, device_type, priority = "partial", "cpu", 50

    @classmethod
    def is_available(cls):
        return True, ""

    @classmethod
    def default_device(cls):
        return "cpu"

    @classmethod
    def create(cls, device):
        return _PartialOps(device)


class _MissingBackend(_PartialBackend):
    name, priority = "missing", 100

    @classmethod
    def is_available(cls):
        return False, "vendor library 'nolib' not installed (pip install dsv32[cuda])"


class _EP:
    def __init__(self, name, cls=None, error=None):
        self.name, self._cls, self._error = name, cls, error

    def load(self):
        if self._error:
            raise self._error
        return self._cls


@pytest.fixture
def fake_plugins(monkeypatch):
    from dsv32.backends.reference import ReferenceBackend

    eps = [_EP("reference", ReferenceBackend), _EP("partial", _PartialBackend), _EP("missing", _MissingBackend),
           _EP("broken", error=ImportError("boom"))]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.GROUP else [])
    monkeypatch.delenv("DSV32_BACKEND", raising=False)


def test_reference_registered_through_entry_point():
    names = {ep.name for ep in registry.entry_points(group="dsv32.backends")}
    assert "reference" in names  # pyproject's [project.entry-points."dsv32.backends"]
    assert registry.select_backend().name == "reference"


def test_interpreter_backend_is_never_auto_selected(monkeypatch):
    """Under TRITON_INTERPRET=1 (CPU CI) the triton backend is available but only when named."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = registry.discover().get("triton")
    if info is None or not info.available:
        pytest.skip("triton not installed")
    assert info.priority is None
    assert registry.select_backend().name == "reference"
    assert registry.select_backend("triton").name == "triton"


def test_auto_selection_by_priority_and_overrides(fake_plugins, monkeypatch):
    found = registry.discover()
    assert not found["missing"].available and "nolib" in found["missing"].reason
    assert not found["broken"].available and "boom" in found["broken"].reason  # a broken plugin never crashes
    assert registry.select_backend().name == "partial"  # highest available priority
    assert registry.select_backend("reference").name == "reference"
    # a device asked for: the highest backend of that device type (LLM(device="cpu") on a GPU host ran Triton's
    # GPU kernels on CPU tensors before), the highest overall when none has that type
    monkeypatch.setattr(_PartialBackend, "default_device", classmethod(lambda cls: "cuda"))
    assert registry.select_backend(device="cpu").name == "reference"
    assert registry.select_backend(device="cuda:0").name == "partial"
    assert registry.select_backend(device="xyz").name == "partial"
    monkeypatch.setenv("DSV32_BACKEND", "reference")
    assert registry.select_backend().name == "reference"
    with pytest.raises(registry.BackendError, match="not available here: vendor library 'nolib'.*Usable"):
        registry.select_backend("missing")
    with pytest.raises(registry.BackendError, match="unknown backend 'nope'"):
        registry.select_backend("nope")


def test_per_op_fallback_logged_once(fake_plugins, caplog):
    registry._fallback_logged.clear()
    info = registry.discover()["partial"]
    with caplog.at_level(logging.INFO, logger="dsv32.registry"):
        ops = registry.create_ops(info, "cpu")
        registry.create_ops(info, "cpu")
    assert ops.kernel_sources["rms_norm"] == "partial"
    assert ops.kernel_sources["indexer_topk"] == "reference (fallback)"
    assert set(ops.kernel_sources) == set(OP_NAMES)
    fallback_lines = [r for r in caplog.records if "indexer_topk" in r.getMessage()]
    assert len(fallback_lines) == 1
    x = torch.randn(3, 8)  # fallback ops really run
    assert ops.silu_and_mul(x).shape == (3, 4)


def test_llm_runs_on_partial_backend(fake_plugins, tiny_dir):
    from dsv32 import LLM, SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = LLM(model=tiny_dir, dtype="float32", backend="partial")
    b = LLM(model=tiny_dir, dtype="float32", backend="reference")
    assert a.backend.name == "partial"
    assert a.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0].token_ids == \
        b.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0].token_ids


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv32.server.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_env():
    r = _cli("env")
    assert r.returncode == 0, r.stderr
    assert "selected: reference on cpu" in r.stdout and "indexer_topk" in r.stdout
    assert "decode device graphs: no: the reference backend runs eagerly" in r.stdout
    assert "platform: fp8 float8_e4m3fn (max 448); KV latent layout combined / split" in r.stdout
    assert "NEVER RUN ON AMD HARDWARE" in r.stdout and "NEVER RUN ON ASCEND HARDWARE" in r.stdout
    r = _cli("env", "--backend", "nope")
    assert r.returncode == 2 and "unknown backend 'nope'" in r.stderr


def test_cli_generate_and_demo(tiny_dir, tmp_path):
    from dsv32 import LLM, SamplingParams

    r = _cli("generate", "--model", tiny_dir, "--prompt-token-ids", "[5, 6, 7, 8]", "--max-tokens", "5",
             "--ignore-eos", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = LLM(model=tiny_dir, dtype="float32").generate(
        prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert got["token_ids"] == want[0].token_ids and got["finish_reason"] == "length"
    r = _cli("generate", "--model", str(tmp_path / "absent"), "--prompt-token-ids", "[1]")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = _cli("demo", "--max-tokens", "60")
    assert r.returncode == 0, r.stderr
    assert "I am dsv32-demo" in r.stdout and "</think>" in r.stdout and 'string="true">Paris<' in r.stdout
    assert "accept length" in r.stdout


def test_present_devices_reports_every_marker():
    """conftest skips tests marked cuda/rocm/ascend from this map; it must cover every marker."""
    from dsv32.backends import present_devices

    present = present_devices()
    assert set(present) == {"cuda", "rocm", "ascend"}
    assert present["cuda"] == (torch.cuda.is_available() and torch.version.hip is None)


# ---- kernel selection (SGLang's --dsa-*-backend / --moe-runner-backend) -----------------------------------
def test_kernel_selection_reference():
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.core.ops import KernelChoiceError, KernelContext

    ops = ReferenceOps("cpu")
    assert ops.select_kernels(KernelContext()) == {"dsa_prefill_backend": "reference", "dsa_decode_backend": "reference",
                                                   "moe_runner_backend": "reference", "fp8_gemm_backend": "reference",
                                                   "dsa_indexer_backend": "reference", "norm_backend": "reference"}
    with pytest.raises(KernelChoiceError, match=r"--dsa-decode-backend flashmla_kv cannot run here .*runnable here: "
                                                r"\['reference'\]"):
        ops.select_kernels(KernelContext(), {"dsa_decode_backend": "flashmla_kv"})
    with pytest.raises(KernelChoiceError, match="--moe-runner-backend magic: unknown; choose one of"):
        ops.select_kernels(KernelContext(), {"moe_runner_backend": "magic"})
    assert ops.select_kernels(KernelContext(), {"dsa_prefill_backend": "auto"})["dsa_prefill_backend"] == "reference"


def test_kernel_selection_cuda_without_vendor_libraries():
    """The CUDA backend's choices with none of FlashMLA / DeepGEMM installed (as on CI): Triton is the default, and
    asking for a vendor kernel is an error that says why and names what runs."""
    pytest.importorskip("triton")
    from dsv32.backends.cuda import vendor
    from dsv32.backends.cuda.ops import CudaOps
    from dsv32.core.ops import KernelChoiceError, KernelContext

    if vendor.status("flash_mla")[0] or vendor.status("deep_gemm")[0]:
        pytest.skip("a vendor library is installed here")
    ops = CudaOps("cpu")
    ctx = KernelContext(kv_cache_fp8=True, fp8_weights=True)
    opts = ops.kernel_options(ctx)
    assert "flash_mla" in opts["dsa_decode_backend"]["flashmla_kv"]
    assert opts["dsa_prefill_backend"]["triton"] == "" and opts["moe_runner_backend"]["triton"] == ""
    assert ops.select_kernels(ctx) == {"dsa_prefill_backend": "auto", "dsa_decode_backend": "auto",
                                       "moe_runner_backend": "triton", "fp8_gemm_backend": "triton",
                                       "dsa_indexer_backend": "triton", "norm_backend": "triton"}
    assert "Triton (FlashMLA is not usable here)" in ops.kernel_notes()["sparse_mla_attention"]
    with pytest.raises(KernelChoiceError, match=r"flashmla_kv cannot run here \(.*flash_mla.*\); runnable here: "
                                                r"\['auto', 'triton'\]"):
        ops.select_kernels(ctx, {"dsa_decode_backend": "flashmla_kv"})
    assert ops.kernel_options(KernelContext(kv_cache_fp8=False))["dsa_decode_backend"]["flashmla_kv"]


def test_llm_rejects_unrunnable_kernel(tiny_dir):
    from dsv32 import LLM
    from dsv32.core.ops import KernelChoiceError

    with pytest.raises(KernelChoiceError, match="runnable here"):
        LLM(model=tiny_dir, dtype="float32", device="cpu", backend="reference",
            kernels={"dsa_prefill_backend": "flashmla_sparse"})


def test_dense_prefill_threshold_env(tiny_dir, monkeypatch):
    """Short prompts take the dense path (no indexer logits) by default; threshold 0 forces the sparse path, which
    selects every key when kv_len ≤ index_topk: the same tokens. Values above index_topk are clamped."""
    from dsv32 import LLM, SamplingParams
    from dsv32.core import envs

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 2, 7, 11], [3, 4]]  # with 4 new tokens: ≤ index_topk = 16 keys
    dense = LLM(model=tiny_dir, dtype="float32", device="cpu", backend="reference")
    assert dense.model.dense_kv_threshold == 16
    calls = []
    monkeypatch.setenv("DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD", "0")
    sparse = LLM(model=tiny_dir, dtype="float32", device="cpu", backend="reference")
    monkeypatch.setattr(sparse.ops, "indexer_topk", lambda *a, **k: calls.append(1) or type(sparse.ops).indexer_topk(
        sparse.ops, *a, **k))
    assert [o.token_ids for o in sparse.generate(prompt_token_ids=prompts, sampling_params=sp)] == \
        [o.token_ids for o in dense.generate(prompt_token_ids=prompts, sampling_params=sp)]
    assert calls  # the sparse path really ran
    monkeypatch.setenv("DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD", "99999")
    assert envs.dense_attn_kv_len_threshold(2048) == 2048
    monkeypatch.setenv("DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD", "many")
    with pytest.raises(ValueError, match="must be an integer"):
        envs.dense_attn_kv_len_threshold(2048)
